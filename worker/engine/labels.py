"""How a candidate of auto's search is named: one wording for the engine's warnings, the job page and the
client's terminal lines. Plain Python only: the API and the remote client import it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def recipe_label(recipe: str, options: Mapping[str, Any]) -> str:
    """'int8_static (entropy)', 'int8_static (minmax, SmoothQuant 0.25) + learned rounding',
    'int4_weight_only + int8 activations + 4-bit embeddings (entropy)': the recipe and the options that make it
    a branch."""
    method = options.get("method")
    hybrid = " + int8 activations" if options.get("int8_activations") else ""
    hybrid += " + 4-bit embeddings" if options.get("quantize_embeddings") else ""
    hybrid += " + 4-bit weights" if options.get("four_bit_weights") else ""
    smooth = f", SmoothQuant {options.get('smoothquant_alpha')}" if options.get("smoothquant") == "on" else ""
    learned = " + learned rounding" if options.get("adaround") == "on" else ""
    return recipe + hybrid + (f" ({method}{smooth})" if method else "") + learned


def candidate_name(recipe: str, options: Mapping[str, Any], excluded_nodes: Sequence[str] = (),
                   activations_16bit: Sequence[str] = (), blocks: Sequence[str] = ()) -> str:
    """The branch's label and its steps: '+ 1 layer in 8 bits' (a 4-bit branch's MatMuls kept in 8 bits),
    '+ 1 activation in 16 bits', '+ 2 layers in float', or for a block step
    '+ 2 residual blocks in float' (the blocks' layers are its excluded nodes)."""
    text = recipe_label(recipe, options)
    eight = int(options.get("int8_most_sensitive") or 0)
    if eight:
        text += f" + {_count(eight, 'layer')} in 8 bits"
    if activations_16bit:
        text += f" + {_count(len(activations_16bit), 'activation')} in 16 bits"
    if blocks:
        return text + f" + {_count(len(blocks), 'residual block')} in float"
    return text + (f" + {_count(len(excluded_nodes), 'layer')} in float" if excluded_nodes else "")
