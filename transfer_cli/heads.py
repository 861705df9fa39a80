"""Heads map backbone features to class logits. Both sizes come from elsewhere (never from YAML):
`in_features` from the backbone's `num_features`, `num_classes` from the data's class names."""

from torch import nn

from transfer_cli.errors import ConfigError


def _check_dropout(dropout: float) -> float:
    # nn.Dropout refuses these too, but from inside the model's construction, as an internal error.
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"model.head.dropout must be at least 0 and below 1 (a probability), got {dropout}.")
    return dropout


class LinearHead(nn.Sequential):
    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0):
        """A linear classifier.

        Args:
            in_features: Feature width, set from the backbone.
            num_classes: Number of classes, set from the data.
            dropout: Dropout probability on the features before the linear layer.
        """
        super().__init__(nn.Dropout(_check_dropout(dropout)), nn.Linear(in_features, num_classes))


class MLPHead(nn.Sequential):
    def __init__(self, in_features: int, num_classes: int, hidden_features: int = 512, dropout: float = 0.1):
        """A two-layer perceptron classifier.

        Args:
            in_features: Feature width, set from the backbone.
            num_classes: Number of classes, set from the data.
            hidden_features: Width of the hidden layer.
            dropout: Dropout probability before each linear layer.
        """
        super().__init__(
            nn.Dropout(_check_dropout(dropout)),
            nn.Linear(in_features, hidden_features),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_features, num_classes),
        )
