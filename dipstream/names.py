"""Names of the things of a decoder layer: the simulator's hooks (``layers.3.in``,
``layers.3.expert.5.out``, ``layers.3.neuron``) and the model file's tensors (``layers.3.q``,
``layers.3.mlp_in``). The one place that spells them out."""

from __future__ import annotations


def layer_key(layer: int, *parts) -> str:
    """``layers.<layer>.<part>...``: the name of something of decoder layer `layer`."""
    return ".".join(("layers", str(int(layer)), *map(str, parts)))


def key_layer(name: str) -> int | None:
    """The layer of a layer key (None for a name that is not one: ``head``, ``final_norm``)."""
    parts = str(name).split(".")
    if len(parts) >= 3 and parts[0] == "layers" and parts[1].isdigit():
        return int(parts[1])
    return None


def key_parts(name: str) -> tuple[str, ...]:
    """What follows ``layers.<i>.`` in a layer key (``("expert", "5", "out")``); () for other names."""
    return tuple(str(name).split(".")[2:]) if key_layer(name) is not None else ()


def key_kind(name: str) -> str:
    """The last part of a name (a hook's kind: ``in``, ``out``, ``neuron``, ``experts``)."""
    return str(name).rsplit(".", 1)[-1]
