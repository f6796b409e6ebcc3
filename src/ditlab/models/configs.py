"""The paper's 12 named DiT configurations: S, B, L, XL with patch sizes 2, 4, 8."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ditlab.errors import UserError

if TYPE_CHECKING:
    from ditlab.models.dit import DiT

# (depth, hidden size, heads) of each model size, as in the paper's Table 1.
SIZES: dict[str, dict[str, int]] = {
    "S": {"depth": 12, "hidden_size": 384, "num_heads": 6},
    "B": {"depth": 12, "hidden_size": 768, "num_heads": 12},
    "L": {"depth": 24, "hidden_size": 1024, "num_heads": 16},
    "XL": {"depth": 28, "hidden_size": 1152, "num_heads": 16},
}
PATCH_SIZES = (2, 4, 8)

MODEL_CONFIGS: dict[str, dict[str, int]] = {
    f"DiT-{size}/{p}": {"depth": d["depth"], "hidden_size": d["hidden_size"], "patch_size": p,
                        "num_heads": d["num_heads"]}
    for size, d in SIZES.items()
    for p in PATCH_SIZES
}  # fmt: skip


def model_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """The DiT constructor arguments of a named config, with overrides applied."""
    if name not in MODEL_CONFIGS:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODEL_CONFIGS)}")
    kwargs: dict[str, Any] = dict(MODEL_CONFIGS[name])
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return kwargs


def create_model(name: str, **overrides: Any) -> DiT:
    """A DiT of a named config, e.g. create_model("DiT-XL/2", input_size=32, num_classes=1000).

    Overrides that are None are ignored, so CLI flags left unset keep the config's values."""
    from ditlab.models.dit import DiT

    return DiT(**model_kwargs(name, **overrides))
