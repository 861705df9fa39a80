"""`transfer fetch`: every missing file listed at once offline; a local server fills an empty cache that
an offline fit then uses."""

import functools
import hashlib
import http.server
import tarfile
import threading
import urllib.request
from pathlib import Path

import pytest
import torch
import torchvision

import transfer_cli.data.cifar10 as cifar10
from transfer_cli.backbones import TorchvisionBackbone
from transfer_cli.download import download_file
from transfer_cli.entry import main

from conftest import TINY_IMAGE_BACKBONE

WEIGHTS = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
PRETRAINED_TINY = [a for a in TINY_IMAGE_BACKBONE if "weights" not in a]  # resnet18 at 32 px, DEFAULT weights


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files, honouring `Range: bytes=N-` as download servers do, and records what was asked."""

    requests: list[tuple[str, str | None]] = []

    def send_head(self):
        self.requests.append((self.path, self.headers.get("Range")))
        asked = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not asked or not path.is_file():
            return super().send_head()
        start = int(asked.removeprefix("bytes=").rstrip("-"))
        body = path.read_bytes()[start:]
        self.send_response(206)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return _Body(body)

    def log_message(self, *args):
        pass


class _Body:
    def __init__(self, data: bytes):
        self.data = data

    def read(self, *args):
        data, self.data = self.data, b""
        return data

    def close(self):
        pass


@pytest.fixture()
def server(tmp_path):
    """A download server on 127.0.0.1 serving tmp_path/served."""
    served = tmp_path / "served"
    served.mkdir()
    _RangeHandler.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_RangeHandler, directory=served))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _fake_weights(served: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """A ResNet18 state dict under a torch-hub name that carries its own sha256 prefix, as upstream's do."""
    torch.manual_seed(7)
    state = torchvision.models.resnet18().state_dict()
    staging = served / "staging.pth"
    torch.save(state, staging)
    name = f"resnet18-{hashlib.sha256(staging.read_bytes()).hexdigest()[:8]}.pth"
    staging.rename(served / name)
    return name, state


def test_fetch_offline_lists_every_missing_file_and_where_it_goes(tmp_path, offline_env, monkeypatch, capsys):
    monkeypatch.setattr(WEIGHTS.value, "url", "http://127.0.0.1:9/models/resnet18-f37072fd.pth")  # refused
    monkeypatch.setattr(cifar10, "ARCHIVE_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    monkeypatch.chdir(tmp_path)
    code = main(["fetch", "--config", "resnet50-cifar10", "--data.root", "cifar", "--data.init_args.download=true",
                 *PRETRAINED_TINY])  # fmt: skip
    out = capsys.readouterr()
    assert code == 2, out.err
    cached = Path(offline_env["TORCH_HOME"]) / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert f"torchvision resnet18 IMAGENET1K_V1: {cached}\n" in out.err
    assert f"CIFAR10: {Path('cifar') / 'cifar-10-batches-py'}\n" in out.err
    assert "2 file(s) this config needs are missing" in out.err and out.out == ""
    assert not Path(offline_env["TORCH_HOME"]).exists() and not (tmp_path / "cifar").exists()  # nothing half-made


def test_fetch_fills_an_empty_cache_that_an_offline_fit_uses(
    tmp_path, server, cifar_root, offline_env, monkeypatch, capsys
):
    served, url = server
    name, state = _fake_weights(served)
    monkeypatch.setattr(WEIGHTS.value, "url", f"{url}/{name}")
    archive = served / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:  # the real files, in upstream's layout
        tar.add(cifar_root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(cifar10, "ARCHIVE_URL", f"{url}/{archive.name}")
    monkeypatch.setattr(cifar10, "ARCHIVE_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    monkeypatch.chdir(tmp_path)
    flags = ["--config", "resnet50-cifar10", "--config", "debug", "--data.root", "cifar",
             "--data.init_args.download=true", *PRETRAINED_TINY]  # fmt: skip
    assert main(["fetch", *flags]) == 0
    cached = Path(offline_env["TORCH_HOME"]) / "hub" / "checkpoints" / name
    data = Path("cifar") / "cifar-10-batches-py"
    assert capsys.readouterr().out == f"torchvision resnet18 IMAGENET1K_V1\t{cached}\nCIFAR10\t{data}\n"
    assert cached.is_file() and not cached.with_name(name + ".part").exists()
    assert (data / "data_batch_1").read_bytes() == (cifar_root / "cifar-10-batches-py" / "data_batch_1").read_bytes()

    def no_network(*args, **kwargs):
        raise AssertionError(f"network used: {args}")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    assert main(["fit", *flags]) == 0
    assert next(tmp_path.rglob("last.ckpt")).is_file()
    # The backbone fit builds reads the fetched file itself.
    backbone = TorchvisionBackbone("resnet18", "DEFAULT", image_size=32)
    assert torch.equal(backbone.model.conv1.weight, state["conv1.weight"])
    # A second fetch finds everything in place and downloads nothing.
    assert main(["fetch", *flags]) == 0 and capsys.readouterr().out == ""


def test_an_interrupted_download_resumes_where_it_stopped(tmp_path, server):
    served, url = server
    name, _ = _fake_weights(served)
    whole = (served / name).read_bytes()
    dest = tmp_path / "cache" / name
    dest.parent.mkdir()
    dest.with_name(name + ".part").write_bytes(whole[:1000])  # what an interrupted download left
    download_file(f"{url}/{name}", dest)
    assert dest.read_bytes() == whole
    assert _RangeHandler.requests == [(f"/{name}", "bytes=1000-")]
    (served / "resnet18-00000000.pth").write_bytes(whole)  # a name whose checksum the content fails
    with pytest.raises(Exception, match="corrupt"):
        download_file(f"{url}/resnet18-00000000.pth", tmp_path / "cache" / "resnet18-00000000.pth")
    assert not list((tmp_path / "cache").glob("resnet18-00000000*"))
