"""The authors' released INP-Former weights (the `model.pth` files linked from github.com/luow23/INP-Former).

Those files are the plain `state_dict()` of the reference's whole model, its frozen DINOv2 encoder included
(Meta's DINOv2 parameter names under `encoder.`). The other names map one to one onto `INPFormerNet`'s:

    prototype_token                 inp_queries
    aggregation.0.*                 extractor.*   (the INP Extractor: one block)
    bottleneck.0.*                  bottleneck.*
    decoder.<i>.attn.learn_scale    decoder.<i>.attn.scale
    decoder.<i>.*                   decoder.<i>.*
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from .errors import InpformerError
from .files import read_torch_file
from .model import INPFormerNet

_ENCODER = "encoder."
_PREFIXES = (("aggregation.0.", "extractor."), ("bottleneck.0.", "bottleneck."), ("decoder.", "decoder."))
_FIX = "pass a model.pth of the official INP-Former code and the --backbone it was trained with"


def read_official(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(encoder weights with Meta's DINOv2 names, the other weights with the reference's names) of a released
    file, read with weights_only=True."""
    path = Path(path)
    state = read_torch_file(path, "PyTorch state dict", _FIX)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise InpformerError(f"{path}: not a state dict of tensors; {_FIX}")
    encoder = {k[len(_ENCODER):]: v for k, v in state.items() if k.startswith(_ENCODER)}
    rest = {k: v for k, v in state.items() if not k.startswith(_ENCODER)}
    if not encoder or "prototype_token" not in rest:
        raise InpformerError(f"{path}: not an INP-Former model (no encoder.* or prototype_token weights); {_FIX}")
    if rest["prototype_token"].dim() != 2:
        raise InpformerError(f"{path}: prototype_token has shape {list(rest['prototype_token'].shape)}, not "
                             f"[INPs, channels]; {_FIX}")
    return encoder, rest


def num_inps(weights: dict[str, Tensor]) -> int:
    """The number of INPs of the reference's weights (rows of its prototype_token)."""
    return weights["prototype_token"].shape[0]


def load_official(net: INPFormerNet, weights: dict[str, Tensor], path: str | Path) -> None:
    """Loads the reference's non-encoder weights into `net` (whose encoder is already set), after checking that
    every name maps onto one of `net`'s parameters, that none is missing and that every shape fits."""
    expected = {k: v for k, v in net.state_dict().items() if not k.startswith(_ENCODER)}
    ours = {theirs: _our_name(theirs) for theirs in weights}
    unknown = sorted(theirs for theirs, name in ours.items() if name not in expected)
    missing = sorted(_their_name(name) for name in expected.keys() - ours.values())
    wrong = [f"{theirs} {list(weights[theirs].shape)} instead of {list(expected[name].shape)}"
             for theirs, name in sorted(ours.items())
             if name in expected and weights[theirs].shape != expected[name].shape]
    if unknown or missing or wrong:
        problems = [f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for what, keys in
                    (("unknown keys", unknown), ("missing keys", missing), ("wrong shapes:", wrong)) if keys]
        raise InpformerError(f"{path}: does not fit INP-Former with this --backbone ({'; '.join(problems)}); {_FIX}")
    net.load_state_dict({ours[k]: v.to(expected[ours[k]].dtype) for k, v in weights.items()}, strict=False)


def _our_name(name: str) -> str | None:
    """`INPFormerNet`'s name for one of the reference's parameters (None: not one of the reference's names)."""
    if name == "prototype_token":
        return "inp_queries"
    for theirs, ours in _PREFIXES:
        if name.startswith(theirs):
            return ours + name[len(theirs):].replace("attn.learn_scale", "attn.scale")
    return None


def _their_name(name: str) -> str:
    """The reference's name for one of `INPFormerNet`'s parameters (its encoder's excepted)."""
    if name == "inp_queries":
        return "prototype_token"
    theirs, ours = next((t, o) for t, o in _PREFIXES if name.startswith(o))
    return theirs + name[len(ours):].replace("attn.scale", "attn.learn_scale")
