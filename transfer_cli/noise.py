"""Lines other libraries print that tell a `transfer` user nothing they can act on."""

import logging

# Lightning logs its advertising through rank_zero_info on these loggers (which one depends on the
# entry point that imported lightning first), at INFO, beside messages worth keeping.
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
_ADVERTS = ("litlogger", "litmodels", "lightning.ai/", "Lightning Experiments platform")


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("Tip:" in message and any(advert in message for advert in _ADVERTS))


def drop_lightning_tips() -> None:
    """Drops Lightning's "Tip: ... install litlogger/litmodels" lines; idempotent."""
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAdverts) for f in logger.filters):
            logger.addFilter(_DropAdverts())
