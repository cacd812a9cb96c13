"""Exact attention views of long contexts without N×N: pooled maps, received attention, entropy, exact rows,
rollout; offline HTML and PNG/SVG pictures. See ``record``."""

from ._result import AttentionMaps, Bins, LayerMaps, dense_rollout, from_dense
from .html import render_html, write_html
from .plot import plot_heads, plot_layers, plot_received, plot_rows
from .record import attention_maps, record

__all__ = [
    "AttentionMaps",
    "Bins",
    "LayerMaps",
    "attention_maps",
    "dense_rollout",
    "from_dense",
    "plot_heads",
    "plot_layers",
    "plot_received",
    "plot_rows",
    "record",
    "render_html",
    "write_html",
]
