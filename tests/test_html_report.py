"""The HTML report (issue #16): a 4-bit ASQ+POST ResNet-20's page, its figures, and Chromium rendering it."""

from __future__ import annotations

import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import qcompiler
from qcompiler import ir, numerics
from qcompiler.cli import main as qcompile_main
from qcompiler.data import load_digits
from qcompiler.errors import QCompileError
from qcompiler.html_report import (
    REPORT_FILES, act_grid, new_figure, observe_inputs, quantizer_inputs, save_figure, slug, weight_view, write_html_report,
)
from qcompiler.modelio import save_checkpoint
from qcompiler.nn.adder import AdderConv2d
from qcompiler.zoo import plain_cnn, resnet20

SPEC = qcompiler.QuantSpec(passes="asq,post", weight_bits=4, act_bits=4, calib_batches=2)


class Page(HTMLParser):
    """What the tests read from index.html: image sources, link targets, element ids, scripts."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.external: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.images.append(a["src"])
        if tag == "a":
            self.links.append(a["href"])
        if tag in ("script", "link", "iframe") or any(
            (v or "").startswith(("http:", "https:", "//")) for k, v in attrs if k in ("src", "href")
        ):
            self.external.append(tag)


@pytest.fixture(scope="module")
def data():
    return load_digits()


@pytest.fixture(scope="module")
def compiled(data):
    torch.manual_seed(0)
    return qcompiler.compile(resnet20(in_channels=1), SPEC, calib_data=data)


@pytest.fixture(scope="module")
def written(tmp_path_factory, compiled, data):
    out = tmp_path_factory.mktemp("report") / "resnet20-asq-post"
    return write_html_report(compiled, out, calib_data=data, program=compiled.lower())


def test_every_image_the_page_references_exists_and_decodes(written):
    page = Page(written.page.read_text())
    folder = written.page.parent
    assert page.images, "the page shows no figure"
    for src in page.images:
        path = folder / src
        assert path.parent == folder and path.is_file(), src  # relative, beside index.html
        with Image.open(path) as im:
            im.verify()  # the PNG's structure and checksums
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 100
            pixels = np.asarray(im.convert("L"))
            assert pixels.min() < 128, f"{src} is blank"
    # every PNG written is on the page, and the page lists exactly what write_html_report returned
    assert sorted(page.images) == sorted(p.name for p in folder.glob("*.png")) == sorted(f.file for f in written.figures)
    assert sorted(p.name for p in folder.iterdir() if p.suffix != ".png") == ["index.html"]


def test_every_figure_is_titled_with_labelled_axes_and_holds_data(written):
    for f in written.figures:
        assert f.title and f.xlabel and f.ylabel and f.values > 0, f


def test_the_page_holds_each_layer_s_figures_and_tables(written, compiled):
    names = {f.file for f in written.figures}
    text = written.page.read_text()
    for layer in ir.compute_layers(compiled.module):
        assert any(n.endswith(f"-{slug(layer.name)}-weights.png") for n in names), layer.name
        assert any(n.endswith(f"-{slug(layer.name)}-input.png") for n in names), layer.name
        asq = ir.input_act(layer).method == "asq"
        assert any(n.endswith(f"-{slug(layer.name)}-beta.png") for n in names) == asq, layer.name
        assert f'id="{layer.name}"' in text
    assert any(n.endswith("-bit-map.png") for n in names) and any(n.endswith("-energy.png") for n in names)
    assert any(n.endswith("-join-input.png") for n in names)  # the residual stream's quantizers
    for heading in ("Bit map", "Float regions", "Residual stream quantizers", "Integer program costs",
                    "ASQ adapter overhead"):
        assert heading in text
    assert "clip range (at β=1)" in text and "β over the calibration samples" in text


def test_the_page_opens_offline_and_its_links_resolve(written):
    page = Page(written.page.read_text())
    assert page.external == []  # no script, stylesheet, frame or remote address
    assert all(link.startswith("#") and link[1:] in page.ids for link in page.links)


def test_levels_come_from_the_quantizers_numerics(compiled):
    gm = compiled.module
    layers = {n.name: n for n in ir.compute_layers(gm)}
    post = weight_view(gm, layers["stages_0_conv1"])
    magnitudes = numerics.power_levels(4, math.sqrt(2), torch.float64).numpy()
    assert np.array_equal(post.grid.levels, np.union1d(-magnitudes, magnitudes))
    assert [b.x for b in post.grid.bounds] == [-1.0, 1.0]
    codes = ir.get(layers["stages_0_conv1"], ir.CODES, ir.WeightCodes)
    weight = gm.get_submodule("stages.0.conv1").weight.detach().double()
    assert np.allclose(post.values, (weight / codes.scale.double().view(-1, 1, 1, 1)).reshape(-1).numpy())

    uniform = weight_view(gm, layers["stem_0"])  # pinned: 8-bit uniform codes
    assert np.array_equal(uniform.grid.levels, np.arange(-128, 128))

    frozen = ir.get(layers["stages_0_conv1"].args[0], ir.STEP, ir.FrozenAct)
    grid = act_grid(frozen, np.array([0.5, 2.0]))
    assert np.allclose(grid.levels, frozen.step * np.arange(16))
    assert [b.x for b in grid.bounds] == pytest.approx([15 * frozen.step, 7.5 * frozen.step, 30 * frozen.step])


def test_beta_is_the_adapter_s_per_sample_factor(compiled, data):
    gm = compiled.module
    node = next(n for n in ir.act_quantizers(gm) if ir.get(n, ir.ACT, ir.ActQuant).method == "asq")
    x = data.x_train[:16]
    observed = observe_inputs(gm, [x], [node])[node.name]
    # the input the quantizer sees, through the module's own adapter
    seen = {}
    hook = gm.get_submodule(node.target).register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        gm.eval()(x)
    hook.remove()
    with torch.no_grad():
        beta = gm.get_submodule(node.target).beta(seen["x"]).double().numpy()
    assert observed.beta() == pytest.approx(beta, rel=1e-5)
    assert observed.count == seen["x"].numel() and observed.lo == float(seen["x"].min())


def test_save_figure_refuses_a_figure_without_title_labels_or_data(tmp_path):
    for title, xlabel, ylabel, values, missing in (("", "x", "y", 1, "title"), ("t", "x", "", 1, "y label"),
                                                   ("t", "x", "y", 0, "no data")):
        fig, ax = new_figure(4, 3)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        with pytest.raises(ValueError, match=missing):
            save_figure(fig, tmp_path / "f.png", values)
    assert not (tmp_path / "f.png").exists()


def test_adder_layers_draw_their_group_ranges(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          AdderConv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 3)).eval()
    calib = torch.randn(32, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    spec = qcompiler.QuantSpec(passes="outlier-clamp,adder-groups", adder_groups=2)
    c = qcompiler.compile(model, spec, calib_data=calib)
    adder = next(n for n in ir.compute_layers(c.module) if ir.ADDER_Q in n.meta)
    scales = ir.get(adder, ir.ADDER_Q, ir.AdderScales)
    view = weight_view(c.module, adder)
    assert sorted(b.x for b in view.grid.bounds) == sorted(s * r for r in scales.group_ranges for s in (-1, 1))
    assert adder in quantizer_inputs(c.module)  # its input is histogrammed with the group ranges
    written = write_html_report(c, tmp_path / "r", calib_data=calib)
    assert any(f.file.endswith(f"-{slug(adder.name)}-input.png") for f in written.figures)
    assert "scale group range(s) r_g" in written.page.read_text()


def test_without_calibration_data_the_page_says_so_and_still_counts_costs(tmp_path, compiled):
    written = write_html_report(compiled, tmp_path / "r", program=compiled.lower())
    assert not any(f.file.endswith(("-input.png", "-beta.png")) for f in written.figures)
    text = written.page.read_text()
    assert "no calibration data given" in text and "Integer program costs" in text


def test_a_report_replaces_an_earlier_one_but_no_other_folder(tmp_path, compiled):
    out = tmp_path / "r"
    write_html_report(compiled, out, max_layers=1)
    (out / "stale.png").write_bytes(b"")  # ours by name: replaced, not kept
    write_html_report(compiled, out, max_layers=1)
    assert not (out / "stale.png").exists() and "Figures omitted" in (out / "index.html").read_text()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(QCompileError, match="holds other files"):
        write_html_report(compiled, out)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no staging folder left behind
    assert REPORT_FILES == ("index.html", "*.png")


def test_cli_report_flag(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / "m.pt"
    # a small network: the ResNet-20 page is checked above, this checks the flag
    save_checkpoint(plain_cnn(width=4), ckpt, "qcompiler.zoo:plain_cnn", {"width": 4})
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "tiny.npz", x=rng.random((16, 1, 8, 8), dtype=np.float32), y=np.arange(16) % 4)
    monkeypatch.chdir(tmp_path)
    args = ["m.pt", "--passes", "asq,post", "--bits", "4", "--data", "tiny.npz", "--emit", "int", "--quiet"]
    assert qcompile_main([*args, "--report", "rep"]) == 0
    assert "report: rep/index.html" in capsys.readouterr().out
    assert "Integer program costs" in (tmp_path / "rep" / "index.html").read_text()
    for clash in (["--out", "new"], ["--out", "o", "--dump-ir", "new/ir"]):
        assert qcompile_main([*args, "--report", "new", *clash]) == 2
        assert "overlap" in capsys.readouterr().err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    assert qcompile_main([*args, "--report", "notes"]) == 2
    assert "holds other files" in capsys.readouterr().err


# --------------------------------------------------------------------------- Chromium

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Appended to a copy of the page: after load, writes how many images decoded into the DOM.
PROBE = """<script>
window.addEventListener("load", function () {
  var ok = 0, imgs = document.images;
  for (var i = 0; i < imgs.length; i++) if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++;
  document.title = "images " + ok + "/" + imgs.length;
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_headless_chromium_renders_every_figure(written, tmp_path):
    folder = tmp_path / "page"
    shutil.copytree(written.page.parent, folder)
    page = folder / "index.html"
    page.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    cmd = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage",
           "--virtual-time-budget=10000", "--dump-dom", page.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    n = len(written.figures)
    assert f"<title>images {n}/{n}</title>" in dom, dom[:300]
