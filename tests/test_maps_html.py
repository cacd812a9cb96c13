"""attnopt.maps.html: the offline report page.

Structure (no browser): self-contained (no network), every layer / head present and decodable to the
pooled maps within the quantization step, hostile token text escaped, size within ``max_bytes`` for a
recording shaped like 16K-token SmolLM2, clear errors. Browser: headless Debian chromium draws two deep-
linked views, which differ, and sets the rendered marker for each (skipped, with the install command,
where chromium is missing).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import re
import shutil
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch

from attnopt.maps import Bins, from_dense
from attnopt.maps.html import MAX_ROWS, _coarsen, _pool_map, render_html, write_html

from ._maps_data import HOSTILE, small_maps, small_weights, smollm2_16k_shaped

MB5 = 5_000_000


# ------------------------------------------------------------------------------------------------ helpers
class _Tags(HTMLParser):
    """Every start tag with its attributes, and the text of each script element."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if self._in_script:
            self.scripts.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts[-1] += data


def parse(page: str) -> _Tags:
    p = _Tags()
    p.feed(page)
    p.close()
    return p


def data_of(page: str) -> dict[str, Any]:
    """The page's embedded JSON."""
    m = re.search(r'<script type="application/json" id="attnopt-data">(.*?)</script>', page, re.S)
    assert m is not None
    return json.loads(m.group(1))


def unpack(blob: dict[str, Any], cols: int | None = None) -> torch.Tensor:
    """A blob's uint8 codes as the page's JavaScript reads them (inflate, then undo the 'Up' filter)."""
    raw = zlib.decompress(base64.b64decode(blob["z"]))
    codes = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)
    if blob.get("f"):
        assert cols is not None
        codes = codes.view(-1, cols).to(torch.int64).cumsum(0).remainder(256).to(torch.uint8).flatten()
    return codes


def decode_log(codes: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Codes -> values as the page shows them (0 stays 0)."""
    v = torch.pow(10.0, lo + (codes.double() - 1) / 254 * (hi - lo))
    return torch.where(codes == 0, 0.0, v)


def heads_of(d: dict[str, Any], stat: str, layer: int) -> torch.Tensor:
    """(H, R, C) decoded head maps of one layer."""
    R, C = len(d["axes"]["hq"]["labels"]), len(d["axes"]["hk"]["labels"])
    blob = d["heat"]["heads"]["blobs"][stat][layer]
    codes = unpack(blob, C).view(-1, R, C)
    return torch.stack([decode_log(codes[h], blob["lo"][h], blob["hi"][h]) for h in range(codes.shape[0])])


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    """Run this module's tensor work on one thread. It is many small memory-bound ops, no faster on more
    threads; on a shared, busy machine, OpenMP threads waiting for each other made the 16K report take
    ~30 s instead of ~1.5 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small() -> Any:
    return small_maps()


@pytest.fixture(scope="module")
def small_page(small: Any) -> str:
    return render_html(small)


@pytest.fixture(scope="module")
def big_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], Any]:
    """The 16K-SmolLM2-shaped recording written once: (path, info, maps)."""
    maps = smollm2_16k_shaped()
    path = tmp_path_factory.mktemp("big") / "report.html"
    return path, write_html(maps, path), maps


# -------------------------------------------------------------------------------------------- structure
def test_page_is_self_contained(small_page: str) -> None:
    """Inline CSS and JS only: nothing is loaded from anywhere, no URL at all."""
    assert "http://" not in small_page and "https://" not in small_page and "//cdn" not in small_page
    assert not re.search(r"@import|url\(|@font-face", small_page)
    tags = parse(small_page)
    assert not [t for t, a in tags.tags if "src" in a or "href" in a], "no element may load a resource"
    assert not [t for t, _ in tags.tags if t in ("link", "iframe", "img", "object", "embed")]
    scripts = [a for t, a in tags.tags if t == "script"]
    assert scripts == [{"type": "application/json", "id": "attnopt-data"}, {}]
    js = tags.scripts[1]
    assert not re.search(r"\bfetch\(|XMLHttpRequest|WebSocket|importScripts|\bimport\(", js)
    assert small_page.startswith("<!doctype html>") and '<meta charset="utf-8">' in small_page


def test_page_has_selectors_hash_and_marker(small_page: str) -> None:
    ids = {a.get("id") for _, a in parse(small_page).tags}
    assert {
        "layer",
        "head",
        "stat",
        "heat",
        "legend",
        "hover",
        "received",
        "entropy",
        "rows",
        "rollout",
    } <= ids
    assert {"meta", "rows-section", "rollout-section"} <= ids
    js = parse(small_page).scripts[1]
    for needle in (
        "hashchange",
        "location.hash",
        "dataset.rendered",
        "dataset.heatmapRect",
        "DecompressionStream",
    ):
        assert needle in js


def test_data_for_every_layer_and_head(small: Any, small_page: str) -> None:
    d = data_of(small_page)
    L, H = small.num_layers, small.num_heads
    assert (d["L"], d["H"], d["Sq"], d["Sk"], d["stats"]) == (L, H, small.Sq, small.Sk, ["mean", "max"])
    R, C = len(d["axes"]["hq"]["labels"]), len(d["axes"]["hk"]["labels"])
    oR, oC = len(d["axes"]["oq"]["labels"]), len(d["axes"]["ok"]["labels"])
    for stat in ("mean", "max"):
        heads = d["heat"]["heads"]["blobs"][stat]
        assert len(heads) == L
        for blob in heads:
            assert unpack(blob, C).numel() == H * R * C and len(blob["lo"]) == len(blob["hi"]) == H
        layers = d["heat"]["layers"]["blobs"][stat]
        assert len(layers) == L and all(unpack(b, oC).numel() == oR * oC for b in layers)
        assert unpack(d["heat"]["all"]["blobs"][stat], oC).numel() == oR * oC
    P, Q = len(d["axes"]["ck"]["labels"]), len(d["axes"]["cq"]["labels"])
    assert unpack(d["received"]).numel() == (L + 1) * (H + 1) * P == len(d["received"]["lo"]) * P
    assert unpack(d["entropy"]).numel() == (L + 1) * (H + 1) * Q
    n = len(small.query_rows)
    assert d["rows"]["positions"] == small.query_rows
    assert unpack(d["rows"]).numel() == (L + 1) * (H + 1) * n * P
    assert d["rollout"]["positions"] == small.rollout_rows and unpack(d["rollout"]).numel() == P
    assert d["meta"]["timings"] == {"record_s": 0.12}


def test_decoded_maps_match_the_recording(small: Any, small_page: str) -> None:
    """Every head map decodes to the pooled map within half a quantization step (log scale) wherever the
    weight is above the image's low end, to exactly 0 where nothing was attended, and to the low end below."""
    d = data_of(small_page)
    for stat in ("mean", "max"):
        for layer in range(small.num_layers):
            got, want = heads_of(d, stat, layer), small.pooled(layer, stat).double()
            blob = d["heat"]["heads"]["blobs"][stat][layer]
            for h in range(small.num_heads):
                lo, hi = blob["lo"][h], blob["hi"][h]
                assert torch.equal(got[h] == 0, want[h] == 0)
                above = want[h] >= 10**lo
                step = (hi - lo) / 254
                err = (got[h][above].log10() - want[h][above].log10()).abs()
                assert err.max() <= step / 2 + 1e-4, (stat, layer, h)
                below = got[h][(want[h] > 0) & ~above]
                assert torch.allclose(below, torch.full_like(below, 10**lo), rtol=1e-4)


def test_curves_decode_to_the_recording(small: Any, small_page: str) -> None:
    """Received attention per head and its mean over heads decode within the quantization step (64 keys:
    no pooling); entropy within 1/255 of its max."""
    d = data_of(small_page)
    L, H = small.num_layers, small.num_heads
    P = len(d["axes"]["ck"]["labels"])
    assert small.Sk == P
    codes = unpack(d["received"]).view((L + 1) * (H + 1), P)
    rec = small.received[:, 0].double()  # (L, H, Sk)
    rec = torch.cat([rec, rec.mean(1, keepdim=True)], 1)
    for layer in range(L):
        for h in range(H + 1):
            i = layer * (H + 1) + h
            lo, hi = d["received"]["lo"][i], d["received"]["hi"][i]
            got, want = decode_log(codes[i], lo, hi), rec[layer, h]
            above = want >= 10**lo
            err = (got[above].log10() - want[above].log10()).abs().max()
            assert err <= (hi - lo) / 508 + 1e-4, (layer, h)
    ent = unpack(d["entropy"]).view((L + 1) * (H + 1), -1).double() / 255
    ent = ent * torch.tensor(d["entropy"]["hi"], dtype=torch.float64)[:, None]
    want = small.entropy[0, 0, 0].double()
    assert (ent[0] - want).abs().max() <= want.max() / 255


def test_hostile_tokens_are_escaped(small: Any, small_page: str) -> None:
    """Token text and meta with markup cannot end the data script or add elements; the text survives."""
    tags = parse(small_page)
    assert [t for t, _ in tags.tags].count("script") == 2
    assert not [t for t, _ in tags.tags if t in ("img", "b")]
    blob = re.search(r'id="attnopt-data">(.*?)</script>', small_page, re.S).group(1)  # type: ignore[union-attr]
    assert "<" not in blob and ">" not in blob and "&" not in blob and "\u2028" not in blob
    d = data_of(small_page)
    assert d["axes"]["hk"]["labels"] == small.labels("k")
    assert d["axes"]["hq"]["labels"] == small.labels("q")
    assert any("</script>" in t for t in d["axes"]["ck"]["labels"])
    assert d["meta"]["model"] == "synthetic </script><b>model</b>"
    assert "<title>synthetic &lt;/script&gt;&lt;b&gt;model&lt;/b&gt;</title>" in small_page
    assert d["rows"]["labels"] == [f"32 {HOSTILE[32 % 10]}", f"63 {HOSTILE[63 % 10]}"]


def test_title_argument_and_write_matches_render(small: Any, tmp_path: Path) -> None:
    info = write_html(small, tmp_path / "r.html", title="Mine & <yours>")
    page = (tmp_path / "r.html").read_text("utf-8")
    assert page == render_html(small, title="Mine & <yours>")
    assert info["bytes"] == (tmp_path / "r.html").stat().st_size
    assert "<h1>Mine &amp; &lt;yours&gt;</h1>" in page and data_of(page)["title"] == "Mine & <yours>"
    assert info["head_bins"] == (len(small.q_bins), len(small.k_bins)) == info["overview_bins"]
    assert (info["layers"], info["heads"], info["rows_shown"], info["rollout_rows_shown"]) == (3, 2, 2, 1)


def test_mean_only_no_rows_odd_meta_batch(tmp_path: Path) -> None:
    """A recording with only the mean stat, no rows / rollout, batch 2 and meta values JSON lacks."""
    m = small_maps()
    m.layers = [dataclasses.replace(lm, rows=None) for lm in m.layers]
    m = dataclasses.replace(m, stats=("mean",), query_rows=[], rollout_rows=[], rollout=None)
    for lm in m.layers:
        lm.received = torch.cat([lm.received, lm.received])
        lm.entropy = torch.cat([lm.entropy, lm.entropy])
        lm.tiles = [(a, b, c, e, {"mean": torch.cat([t["mean"], t["mean"]])}) for a, b, c, e, t in lm.tiles]
    m.meta = {"nan": float("nan"), "t": torch.tensor([1.5, 2.0]), "obj": object(), 3: "three"}
    d = data_of(render_html(m))
    assert d["stats"] == ["mean"] and list(d["heat"]["heads"]["blobs"]) == ["mean"]
    assert d["rows"] is None and d["rollout"] is None and d["B"] == 2
    assert d["meta"]["nan"] == "nan" and d["meta"]["t"] == [1.5, 2.0] and d["meta"]["3"] == "three"


def test_fewer_queries_than_keys_and_an_all_zero_map() -> None:
    """Sq < Sk (queries at the end of the keys, as after a cache) gives R != C bins and curves of their own
    lengths; a head that attended nothing (all 0) decodes to all 0."""
    w = small_weights(layers=2, heads=2, S=96)
    w = [x[:, :, -24:] / x[:, :, -24:].sum(-1, keepdim=True) for x in w]
    w[1][:, 1] = 0
    m = from_dense(w, resolution=32, sink_tokens=2)
    d = data_of(render_html(m))
    R, C = len(d["axes"]["hq"]["labels"]), len(d["axes"]["hk"]["labels"])
    assert (len(m.q_bins), len(m.k_bins)) == (R, C) and R < C
    assert (len(d["axes"]["cq"]["labels"]), len(d["axes"]["ck"]["labels"])) == (24, 96)
    got = heads_of(d, "mean", 1)
    assert got.shape == (2, R, C) and not got[1].any() and got[0].any()


def test_pooling_further_is_exact() -> None:
    """Merging recorded bins gives the token-weighted mean / the max of the dense weights over the merged
    bins, with the sink bins kept alone."""
    w = small_weights(layers=1, heads=2, S=200)[0].double()
    m = from_dense([w], resolution=100, sink_tokens=3)
    for stat in ("mean", "max"):
        got, qb, _ = _pool_map(m.pooled(0, stat).double(), m.q_bins, m.k_bins, 30, stat)
        assert len(qb) <= 30 and qb.edges[:4].tolist() == [0, 1, 2, 3]
        e = qb.edges.tolist()
        want = torch.empty_like(got)
        for r in range(len(e) - 1):
            for c in range(len(e) - 1):
                block = w[0, :, e[r] : e[r + 1], e[c] : e[c + 1]]
                want[:, r, c] = block.mean((-1, -2)) if stat == "mean" else block.amax((-1, -2))
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), stat


def test_coarsen_drops_sinks_that_do_not_fit() -> None:
    b = Bins.make(1000, 500, 4)
    nb, s, g = _coarsen(b, 12)
    assert s == 0 and len(nb) <= 12 and nb.edges[0] == 0 and nb.edges[-1] == 1000
    nb, s, g = _coarsen(b, 600)
    assert nb is b and g == 1


def test_max_bytes_picks_a_coarser_level(tmp_path: Path) -> None:
    m = small_maps(layers=2, heads=2, S=160, resolution=160)
    full = write_html(m, tmp_path / "full.html")
    assert full["head_resolution"] == 160
    budget = full["bytes"] // 2
    info = write_html(m, tmp_path / "small.html", max_bytes=budget)
    assert (tmp_path / "small.html").stat().st_size == info["bytes"] <= budget
    assert 16 <= info["head_resolution"] < 160
    d = data_of((tmp_path / "small.html").read_text("utf-8"))
    assert len(d["axes"]["hk"]["labels"]) == info["head_resolution"]
    assert d["axes"]["hk"]["edges"][:3] == [0, 1, 2]  # the two sink tokens stay alone


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_bytes": 2000}, ValueError, r"max_bytes=2000: too small; even with 16x16 bins per head"),
        ({"max_bytes": 0}, ValueError, r"max_bytes=0; allowed: an int > 0"),
        ({"max_bytes": 1.5e6}, ValueError, r"max_bytes=1500000.0; allowed"),
        ({"max_bytes": True}, ValueError, r"max_bytes=True; allowed"),
        ({"title": 3}, TypeError, r"title=3; allowed: a str or None"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type, match: str) -> None:
    m = small_maps(layers=2, heads=2, S=128, resolution=64)
    with pytest.raises(error, match=match):
        render_html(m, **kwargs)


def test_bad_maps() -> None:
    with pytest.raises(TypeError, match=r"expected an attnopt\.maps\.AttentionMaps"):
        render_html("maps")  # type: ignore[arg-type]
    m = dataclasses.replace(small_maps(), layers=[])
    with pytest.raises(ValueError, match="nothing to show"):
        render_html(m)


def test_16k_smollm2_shaped_fits_5mb(big_report: tuple[Path, dict[str, Any], Any]) -> None:
    """30 layers x 9 heads x 501 x 501 bins with noisy sink-heavy content: at most 5 MB, the head maps as
    fine as fits (reported), every layer and head present, curves and means as promised."""
    path, info, _ = big_report
    size = path.stat().st_size
    print(f"\n16K SmolLM2-shaped report: {info}")
    assert size == info["bytes"] <= MB5
    assert size > MB5 // 2, "what the head maps leave should go to curves and means, not be wasted"
    assert info["layers"] == 30 and info["heads"] == 9
    assert 48 <= info["head_resolution"] <= 501 and info["head_bins"][0] == info["head_resolution"]
    assert info["overview_bins"][0] >= info["head_resolution"]
    assert info["curve_points"] <= 2048 and info["rows_shown"] == 2 and info["rollout_rows_shown"] == 1
    d = data_of(path.read_text("utf-8"))
    R, C = info["head_bins"]
    for stat in ("mean", "max"):
        blobs = d["heat"]["heads"]["blobs"][stat]
        assert len(blobs) == 30 and all(len(b["lo"]) == 9 for b in blobs)
    assert unpack(d["heat"]["heads"]["blobs"]["max"][29], C).numel() == 9 * R * C
    # Sinks stay visible: the received curve's maximum is the first key in every layer and head.
    P = info["curve_points"]
    rec = unpack(d["received"]).view(31 * 10, P)
    assert (rec.argmax(1) == 0).all()
    assert d["axes"]["hk"]["edges"][:5] == [0, 1, 2, 3, 4]
    assert info["head_resolution"] == len(d["axes"]["hq"]["labels"])


def test_max_rows_is_respected(tmp_path: Path) -> None:
    w = small_weights(layers=1, heads=1, S=40)
    m = from_dense(w, resolution=40, sink_tokens=1, query_rows=list(range(MAX_ROWS + 3)))
    info = write_html(m, tmp_path / "r.html")
    assert info["rows_shown"] == MAX_ROWS


# --------------------------------------------------------------------------------------------- browser
@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium (or chromium-browser); the browser tests skip, saying how to install it, without."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip(
            "no chromium on PATH for the headless-browser test; install it with `apt-get install chromium`"
        )
    return exe


def _run_chromium(exe: str, url: str, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        "--window-size=1200,1400",
        *args,
        url,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def _open(exe: str, url: str, tmp: Path, png: Path | None = None) -> dict[str, Any]:
    """Load ``url`` in headless chromium, let its scripts run; return the attributes of <body>, the hover
    read-out's text ('hover') and, with ``png``, the screenshot as a (1400, 1200, 3) uint8 tensor ('shot')."""
    out = _run_chromium(exe, url, tmp, "--dump-dom", *([f"--screenshot={png}"] if png else []))
    assert out.returncode == 0, out.stderr[-2000:]
    body = next(a for t, a in parse(out.stdout).tags if t == "body")
    m = re.search(r'<div id="hover" class="readout">(.*?)</div>', out.stdout, re.S)
    res: dict[str, Any] = {**body, "hover": m.group(1) if m else None}
    if png is not None:
        from PIL import Image

        assert png.exists(), f"no screenshot: {out.stderr[-2000:]}"
        img = Image.open(png).convert("RGB")
        assert img.size == (1200, 1400)
        res["shot"] = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(1400, 1200, 3)
    return res


def _crop(img: torch.Tensor, rect: str | None) -> torch.Tensor:
    assert rect is not None
    x, y, w, h = (int(v) for v in rect.split(","))
    return img[y : y + h, x : x + w]


def test_browser_draws_deep_linked_views(chromium: str, small: Any, tmp_path: Path) -> None:
    """Two hashes give two drawn views (the marker proves the scripts ran and which view); the heatmaps are
    far from blank and differ."""
    exe = chromium
    path = tmp_path / "report.html"
    write_html(small, path)
    views = {  # layer 0 head 0: a local head; layer 1 head 1: key stripes (tests/_maps_data.py)
        "layer=0&head=0": "layer=0 head=0 stat=mean",
        "layer=1&head=1&stat=max": "layer=1 head=1 stat=max",
    }
    crops = []
    for i, (hash_, marker) in enumerate(views.items()):
        page = _open(exe, f"{path.as_uri()}#{hash_}", tmp_path, tmp_path / f"view{i}.png")
        assert page.get("data-rendered") == marker and "data-error" not in page
        crop = _crop(page["shot"], page.get("data-heatmap-rect"))
        colours = torch.unique(crop.reshape(-1, 3), dim=0)
        assert len(colours) >= 20, f"the heatmap of {hash_} looks blank: {len(colours)} colours"
        assert len(torch.unique(page["shot"].reshape(-1, 3), dim=0)) >= 50
        crops.append(crop.float())
    diff = (crops[0] - crops[1]).abs().mean()
    assert diff > 10, f"the two views look alike (mean abs difference {diff:.1f})"


def test_browser_hash_fallback_and_deep_linked_cell(chromium: str, small: Any, tmp_path: Path) -> None:
    """A bad hash falls back to the defaults, layer=mean forces head=mean, and a deep-linked cell shows its
    query / key labels and value, the tokens' markup as text."""
    exe = chromium
    path = tmp_path / "report.html"
    write_html(small, path)
    page = _open(exe, f"{path.as_uri()}#layer=99&head=x&stat=nope", tmp_path)
    assert page.get("data-rendered") == "layer=0 head=mean stat=mean"
    page = _open(exe, f"{path.as_uri()}#layer=mean&head=1", tmp_path)
    assert page.get("data-rendered") == "layer=mean head=mean stat=mean"

    # Cell (row 4, col 3) of layer 2 head 0: query bin 4 holds tokens 8-10, key bin 3 tokens 5-7 (2 sinks,
    # then bins of 3); their text has markup, which must come out as text.
    page = _open(exe, f"{path.as_uri()}#layer=2&head=0&cell=4,3", tmp_path)
    assert page.get("data-rendered") == "layer=2 head=0 stat=mean"
    q, k = small.labels("q")[4], small.labels("k")[3]
    assert q == "8-10  xé<s>" and k.startswith("5-7 \n<img")
    hover = page["hover"]
    assert hover is not None and "<img" not in hover and "<s>" not in hover
    k_shown = k.replace("\n", "\u21b5")  # line breaks in token text are shown as ↵
    assert html.unescape(hover).startswith(f"query {q}\nkey   {k_shown}\nmean weight \u2248 ")


def test_browser_draws_the_16k_report(
    chromium: str, big_report: tuple[Path, dict[str, Any], Any], tmp_path: Path
) -> None:
    """The 5 MB page unpacks and draws in headless chromium: last layer, last head, max."""
    exe = chromium
    page = _open(exe, f"{big_report[0].as_uri()}#layer=29&head=8&stat=max", tmp_path)
    assert page.get("data-rendered") == "layer=29 head=8 stat=max" and "data-error" not in page
