"""attnopt.maps.plot: every picture is written as PNG and SVG (and PDF), decodes, is not blank, shows the data
it was given (pixel checks on maps with a known bright column or diagonal, token text in the labels), and
bad arguments fail before anything is written."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib", reason="attnopt.maps.plot needs matplotlib: pip install 'attnopt[maps]'")

import matplotlib
import matplotlib.image

from attnopt.maps import (
    AttentionMaps,
    Bins,
    LayerMaps,
    from_dense,
    plot,
)

N = 64
TOKENS = ["SINK"] + [f"w{i}" for i in range(1, N)]


def causal_weights(L: int, H: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    """L random causal softmax maps (1, H, n, n) with a strong sink on key 0."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    out = []
    for li in range(L):
        s = torch.randn(1, H, n, n, generator=g) * 1.5
        s[..., 0] += 2.0 + li
        out.append(s.masked_fill(~mask, float("-inf")).softmax(-1))
    return out


@pytest.fixture(scope="module")
def maps() -> AttentionMaps:
    return from_dense(
        causal_weights(2, 3, N),
        resolution=40,
        sink_tokens=4,
        query_rows=[N - 1, 20],
        rollout_rows=[N - 1],
        tokens=TOKENS,
    )


def read_png(path) -> np.ndarray:
    img = matplotlib.image.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    return img[..., :3]


def check_png(path) -> None:
    rgb = read_png(path)
    assert rgb.std() > 0.05, "blank picture"
    packed = (rgb * 255).round().astype(np.uint32) @ np.array([1 << 16, 1 << 8, 1], dtype=np.uint32)
    assert len(np.unique(packed)) > 50, "too few colours for a heatmap or curves"


def check_svg(path) -> str:
    text = path.read_text()
    root = ET.fromstring(text)
    assert root.tag.endswith("svg")
    assert len(text) > 5000
    return text


# (name, call, formats): every function as PNG and SVG, its variants as one of them (a render is ~0.2 s).
CALLS = [
    ("heads", lambda m, p: plot.plot_heads(m, p, layer=1), ("png", "svg")),
    (
        "heads_max_linear",
        lambda m, p: plot.plot_heads(m, p, layer=-1, stat="max", log=False, cols=2),
        ("png",),
    ),
    ("layers", lambda m, p: plot.plot_layers(m, p), ("png", "svg")),
    ("layers_head", lambda m, p: plot.plot_layers(m, p, head=2, stat="max"), ("svg",)),
    ("received", lambda m, p: plot.plot_received(m, p), ("png", "svg")),
    (
        "received_heatmap",
        lambda m, p: plot.plot_received(m, p, kind="heatmap", heads="max", layers=[1, 0]),
        ("png",),
    ),
    ("rows", lambda m, p: plot.plot_rows(m, p), ("png", "svg")),
    ("rows_log_head", lambda m, p: plot.plot_rows(m, p, layer=0, head=1, log=True, which="rows"), ("png",)),
]


@pytest.mark.parametrize("name,call,formats", CALLS, ids=[c[0] for c in CALLS])
def test_writes_png_and_svg(maps, tmp_path, name, call, formats):
    for i, fmt in enumerate(formats):
        path = tmp_path / f"{name}.{fmt}"
        arg = path if i == 0 else str(path)  # a Path or a str; the path comes back as a str
        assert call(maps, arg) == str(path)
        check_png(path) if fmt == "png" else check_svg(path)


def test_pdf_and_no_pyplot_figures_left(maps, tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    out = plot.plot_layers(maps, tmp_path / "layers.PDF")  # the extension in any case
    with open(out, "rb") as f:
        assert f.read(5) == b"%PDF-"
    assert plt.get_fignums() == before


# ------------------------------------------------------------------------------------ the pixels
VIRIDIS_TOP = np.array([253, 231, 37]) / 255


def bright(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) of the pixels close to viridis' top colour, left of the colorbar (single-panel figures keep
    their colorbar in the right quarter)."""
    panel = rgb[:, : int(rgb.shape[1] * 0.72)]
    ys, xs = np.nonzero(np.abs(panel - VIRIDIS_TOP).max(-1) < 0.12)
    return ys, xs


def one_hot_maps(n: int, where: str) -> AttentionMaps:
    w = torch.zeros(1, 1, n, n)
    if where == "sink":
        w[..., 0] = 1.0
    else:
        w[..., torch.arange(n), torch.arange(n)] = 1.0
    return from_dense([w], resolution=n, sink_tokens=4)


def test_heatmap_shows_a_sink_column_and_a_diagonal(tmp_path):
    """All attention on key 0 draws one bright column; all on the diagonal draws a bright diagonal."""
    n = 32
    ys_s, xs_s = bright(read_png(plot.plot_layers(one_hot_maps(n, "sink"), tmp_path / "s.png", log=False)))
    ys_d, xs_d = bright(read_png(plot.plot_layers(one_hot_maps(n, "diag"), tmp_path / "d.png", log=False)))
    assert len(xs_s) > 100 and len(xs_d) > 100
    # Sink: a thin column as tall as the panel.
    assert np.ptp(xs_s) < 0.1 * np.ptp(ys_s)
    # Diagonal: as wide as tall, x rising with y, and reaching far to the right of the sink column.
    assert np.ptp(xs_d) > 0.8 * np.ptp(ys_d)
    assert np.corrcoef(xs_d, ys_d)[0, 1] > 0.95
    assert xs_d.max() > xs_s.max() + 0.8 * np.ptp(ys_s)


def test_long_context_sink_stays_visible(tmp_path):
    """16K tokens in 501 bins: the 1-token sink bins are drawn wide enough to see next to 497 others."""
    n = 16384
    b = Bins.make(n, 501, 4)
    R = len(b)
    m = torch.full((1, 1, R, R), 1e-5).tril()
    m[..., 0] = 1.0
    rec = torch.linspace(50, 1, n).view(1, 1, n)
    lm = LayerMaps([(0, R, 0, R, {"mean": m, "max": m})], rec, torch.zeros(1, 1, n))
    maps = AttentionMaps(b, b, [lm])
    ys, xs = bright(read_png(plot.plot_layers(maps, tmp_path / "long.png", log=False)))
    assert len(xs) > 100 and np.ptp(xs) < 0.1 * np.ptp(ys)
    assert np.ptp(xs) >= 2  # at least a few pixels wide, not a hairline under the frame
    check_svg(Path(plot.plot_received(maps, tmp_path / "long.svg")))


# ---------------------------------------------------------------------------------- label content
def svg_text(call, maps, path) -> str:
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text as text, so that it can be searched
        call(maps, path)
    return path.read_text()


def test_received_labels_the_sinks_with_their_text(maps, tmp_path):
    text = svg_text(lambda m, p: plot.plot_received(m, p), maps, tmp_path / "r.svg")
    assert "key 0 ‘SINK’" in text and "key 3 ‘w3’" in text
    assert "key 4" not in text


def test_rows_label_the_top_keys(tmp_path):
    w = torch.full((1, 2, N, N), 1e-4)
    w[..., 0], w[..., 37], w[..., 50] = 0.3, 0.5, 0.2
    w /= w.sum(-1, keepdim=True)
    tokens = list(TOKENS)
    tokens[37] = "TOP37"
    m = from_dense([w], query_rows=[60], rollout_rows=[60], tokens=tokens)
    text = svg_text(lambda m, p: plot.plot_rows(m, p, top_k=3), m, tmp_path / "rows.svg")
    assert "37 ‘TOP37’" in text and "0 ‘SINK’" in text and "50 ‘w50’" in text
    assert "query 60 ‘w60’" in text and "rollout through all 1 layers" in text


def test_tokens_escape_mathtext(tmp_path):
    w = causal_weights(1, 1, 8)
    tokens = ["$x$", "a\nb", "", "€", "t4", "t5", "t6", "t7"]
    m = from_dense(w, resolution=8, sink_tokens=2, query_rows=[7], tokens=tokens)
    for call in (plot.plot_heads, plot.plot_rows):
        kw = {"layer": 0} if call is plot.plot_heads else {}
        text = svg_text(lambda m, p, call=call, kw=kw: call(m, p, **kw), m, tmp_path / f"{call.__name__}.svg")
        assert "‘$x$’" in text and "‘a\\nb’" in text


# --------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda m, p: plot.plot_heads(m, p, layer=2), IndexError, r"layer=2; allowed: an int in \[0, 2\)"),
        (lambda m, p: plot.plot_heads(m, p, layer=-3), IndexError, "layer=-3"),
        (lambda m, p: plot.plot_heads(m, p, layer="0"), IndexError, "layer='0'"),
        (
            lambda m, p: plot.plot_heads(m, p, layer=0, stat="median"),
            ValueError,
            "stat='median'.*'mean', 'max'",
        ),
        (
            lambda m, p: plot.plot_heads(m, p, layer=0, batch=1),
            IndexError,
            r"batch=1; allowed: an int in \[0, 1\)",
        ),
        (lambda m, p: plot.plot_heads(m, p, layer=0, cols=0), ValueError, "cols=0"),
        (lambda m, p: plot.plot_layers(m, p, cmap="nope"), ValueError, "cmap='nope'"),
        (
            lambda m, p: plot.plot_layers(m, p, head=3),
            IndexError,
            r"head=3; allowed: 'mean', 'max'.*\[0, 3\)",
        ),
        (lambda m, p: plot.plot_layers(m, p, head="sum"), ValueError, "head='sum'"),
        (lambda m, p: plot.plot_received(m, p, heads=-1), IndexError, "heads=-1"),
        (lambda m, p: plot.plot_received(m, p, layers=[0, 5]), IndexError, "layers: 5 out of range"),
        (lambda m, p: plot.plot_received(m, p, layers=[]), ValueError, "layers=\\[\\]"),
        (lambda m, p: plot.plot_received(m, p, kind="bars"), ValueError, "kind='bars'.*'curves'.*'heatmap'"),
        (lambda m, p: plot.plot_received(m, p, sinks=-1), ValueError, "sinks=-1"),
        (lambda m, p: plot.plot_rows(m, p, layer=9), IndexError, "layer=9"),
        (lambda m, p: plot.plot_rows(m, p, which="all"), ValueError, "which='all'"),
        (lambda m, p: plot.plot_rows(m, p, top_k=-1), ValueError, "top_k=-1"),
        (
            lambda m, p: plot.plot_heads(m, str(p)[:-4] + ".jpg", layer=0),
            ValueError,
            "'.jpg' not supported.*.png",
        ),
        (lambda m, p: plot.plot_rows(m, str(p)[:-4], layer=0), ValueError, r"extension '\(none\)'"),
        (lambda m, p: plot.plot_layers(m, 3), TypeError, "path=3"),
        (
            lambda m, p: plot.plot_layers(m.layers, p),
            TypeError,
            "maps: expected an attnopt.maps.AttentionMaps",
        ),
    ],
)
def test_argument_errors(maps, tmp_path, call, exc, match):
    out = tmp_path / "x.png"
    with pytest.raises(exc, match=match):
        call(maps, out)
    assert not list(tmp_path.iterdir()), "nothing is written when the arguments are wrong"


def test_rows_missing(tmp_path):
    bare = from_dense(causal_weights(1, 2, 16), resolution=16)
    with pytest.raises(ValueError, match="no exact rows or rollout recorded; record with query_rows"):
        plot.plot_rows(bare, tmp_path / "r.png")
    only_rows = from_dense(causal_weights(1, 2, 16), resolution=16, query_rows=[3])
    with pytest.raises(ValueError, match="which='rollout': the recording has no rollout"):
        plot.plot_rows(only_rows, tmp_path / "r.png", which="rollout")
    plot.plot_rows(only_rows, tmp_path / "r.png")  # auto: the rows alone


def test_empty_maps(tmp_path):
    b = Bins.make(8, 8, 0)
    with pytest.raises(ValueError, match="maps: empty recording"):
        plot.plot_layers(AttentionMaps(b, b, []), tmp_path / "e.png")


def test_missing_matplotlib_names_the_extra(maps, tmp_path, monkeypatch):
    monkeypatch.setattr(plot, "_MPL", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'attnopt\[maps\]'"):
        plot.plot_heads(maps, tmp_path / "x.png", layer=0)


def test_float64_maps(tmp_path):
    """from_dense keeps float64 weights in float64; the pictures take any float dtype."""
    m = from_dense(
        [w.double() for w in causal_weights(1, 2, 16)], resolution=16, query_rows=[15], rollout_rows=[15]
    )
    assert m.layers[0].received.dtype == torch.float64
    check_png(plot.plot_rows(m, tmp_path / "rows64.png"))
    check_png(plot.plot_layers(m, tmp_path / "layers64.png"))
