"""group_by_length on several processes: each rank a disjoint share of length-grouped batches,
every example once per epoch, and as many steps on every rank (DDP all-reduces every step)."""

import numpy as np
import pytest


@pytest.mark.parametrize(("count", "batch_size", "world"), [(37, 4, 2), (37, 4, 3), (5, 4, 4), (64, 8, 2)])
def test_length_grouped_batches_on_several_processes_give_every_example_once_and_equal_steps(count, batch_size, world):
    from torch.utils.data import DistributedSampler

    from transfer_cli.data.text_batches import DistributedLengthGroupedBatches

    lengths = np.random.default_rng(0).integers(1, 100, count)
    seen = []
    for epoch in (0, 1):
        ranks = [DistributedLengthGroupedBatches(lengths, batch_size, r, world, seed=42) for r in range(world)]
        for sampler in ranks:
            sampler.set_epoch(epoch)  # as Lightning does each epoch
        batches = [list(sampler) for sampler in ranks]
        assert len({len(b) for b in batches}) == 1 and len(batches[0]) == len(ranks[0])  # as many steps each
        examples = sorted(i for rank in batches for batch in rank for i in batch)
        assert examples == list(range(count))  # each example exactly once per epoch, over all ranks
        assert all(0 < len(batch) <= batch_size for rank in batches for batch in rank)
        seen.append(batches)
    assert seen[0] != seen[1]  # a new order every epoch
    assert isinstance(ranks[0], DistributedSampler)  # so Lightning keeps it instead of injecting its own


def test_length_grouped_loader_on_two_processes_collates_its_own_share():
    from transfer_cli.data.text_batches import PadCollate, TokenizedTexts
    from transfer_cli.data.text_files import TextClassificationDataModule

    lengths = [3, 1, 4, 1, 5, 9, 2]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    texts = TokenizedTexts({"input_ids": np.arange(offsets[-1], dtype=np.int32)}, offsets, [0, 1] * 3 + [0], [])
    shares = []
    for rank in (0, 1):
        data = TextClassificationDataModule(class_names=["a", "b"], batch_size=2, group_by_length=True)
        data._splits["train"], data._collate = texts, PadCollate({"input_ids": 0}, pad_left=False)
        data.trainer = type("Trainer", (), {"world_size": 2, "global_rank": rank})()
        shares.append([batch["labels"].tolist() for batch in data.split_loader("train")])
    assert len(shares[0]) == len(shares[1]) == 2
    assert sorted(sum((sum(share, []) for share in shares), [])) == sorted([0, 1] * 3 + [0])
