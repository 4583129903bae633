"""graphdl.ops.products: the matrix products' two kernels (torch's, which is MKL's, and
oneDNN's) agree to float32 rounding on every layout, NaN and infinity included; the
choice between them is kept in the machine's choice file, so every run on a machine
takes the same kernels; training with either matches PyTorch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

import graphdl as gd
from graphdl.ops import choice, products

ONEDNN = torch.backends.mkldnn.is_available()
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="this torch was built without oneDNN")


@pytest.fixture
def choice_file(tmp_path, monkeypatch):
    """A choice file of the test's own, read afresh."""
    path = tmp_path / "choices.json"
    monkeypatch.setenv("GRAPHDL_CHOICES", str(path))
    monkeypatch.setattr(choice, "_KEPT", choice._Kept())
    return path


def _layouts(rows: int, cols: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One matrix's values in the layouts a product meets: contiguous, transposed, every
    other column of a wider one, a view past the start of its storage, expanded (stride 0)."""
    x = torch.randn(rows, cols, generator=gen)
    return {"contiguous": x, "transposed": x.t().contiguous().t(),
            "strided": torch.randn(rows, 2 * cols, generator=gen)[:, ::2],
            "offset": torch.randn(rows + 1, cols, generator=gen)[1:],
            "expanded": torch.randn(1, cols, generator=gen).expand(rows, cols)}


def _close(got: torch.Tensor, want: torch.Tensor, k: int) -> None:
    """Within float32 rounding of a k-term dot product (torch.testing's float32 default
    tolerances scaled by k's square root), and NaN and infinities where torch has them."""
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    finite = torch.isfinite(want)
    assert torch.equal(got[~finite & ~torch.isnan(want)], want[~finite & ~torch.isnan(want)])
    torch.testing.assert_close(got[finite], want[finite], rtol=1.3e-6 * k**0.5, atol=1e-5 * k**0.5)


@needs_onednn
@pytest.mark.parametrize("a_layout", ["contiguous", "transposed", "strided", "offset", "expanded"])
@pytest.mark.parametrize("b_layout", ["contiguous", "transposed", "strided", "expanded"])
@pytest.mark.parametrize("bias_layout", ["contiguous", "strided", "offset", "expanded"])
def test_every_way_of_every_product_agrees_with_torch_on_every_layout(a_layout, b_layout, bias_layout):
    gen = torch.Generator().manual_seed(0)
    m, k, n = 7, 33, 5
    a, b = _layouts(m, k, gen)[a_layout], _layouts(k, n, gen)[b_layout]
    bias = {"contiguous": torch.randn(n, generator=gen), "strided": torch.randn(2 * n, generator=gen)[::2],
            "offset": torch.randn(n + 1, generator=gen)[1:],
            "expanded": torch.randn(1, generator=gen).expand(n)}[bias_layout]
    for ways, args, want in [
        (products.mm.ways, (a, b), a @ b),
        (products.addmm.ways, (bias, a, b), torch.addmm(bias, a, b)),
        (products.addmm_tanh.ways, (bias, a, b), torch.tanh(torch.addmm(bias, a, b))),
    ]:
        for way in ways:
            _close(way(*args), want, k)
            out = torch.full_like(want, float("nan"))  # into a buffer: every element written
            assert way(*args, out=out) is out
            _close(out, want, k)


@needs_onednn
def test_nan_and_infinities_come_out_where_torch_puts_them():
    a = torch.randn(6, 8)
    a[0, 0], a[1, 1], a[2, 2], a[3, 3] = float("nan"), float("inf"), -float("inf"), 3e38
    b = torch.randn(8, 5)
    b[1, 2] = 0.0  # row 1's inf meets a 0 in column 2: NaN there
    bias = torch.tensor([0.0, float("inf"), 1.0, -2.0, float("nan")])
    for ways, args, want in [(products.mm.ways, (a, b), a @ b),
                             (products.addmm.ways, (bias, a, b), torch.addmm(bias, a, b)),
                             (products.addmm_tanh.ways, (bias, a, b), torch.tanh(torch.addmm(bias, a, b)))]:
        assert torch.isnan(want).any() and torch.isinf(a @ b).any()
        for way in ways:
            _close(way(*args), want, 8)


@needs_onednn
def test_onednn_tanh_is_within_1_3_ulp():
    """The tanh oneDNN applies in the product's call: within 1.22 ulp of the true value
    over normally distributed values and large magnitudes (torch's: 0.51)."""
    x = torch.cat([torch.randn(1 << 16) * 3, torch.logspace(-30, 1.5, 4096), -torch.logspace(-30, 1.5, 4096)])
    got = products.onednn_addmm_tanh(torch.zeros(1), x[:, None], torch.ones(1, 1)).flatten()
    true = torch.tanh(x.double())
    ulp = (torch.nextafter(true.float(), torch.tensor(float("inf"))).double() - true.float().double()).abs()
    assert ((got.double() - true).abs() / ulp).max() < 1.3


@needs_onednn
@pytest.mark.parametrize("case", ["float64", "bias of one per row", "bias [1, n]", "scalar bias", "k = 0", "m = 0"])
def test_what_onednn_cannot_take_goes_to_torch_exactly(case, choice_file):
    a, b, bias = torch.randn(300, 300), torch.randn(300, 300), torch.randn(300)
    if case == "float64":
        a, b, bias = a.double(), b.double(), bias.double()
    elif case == "bias of one per row":
        bias = torch.randn(300, 1)
    elif case == "bias [1, n]":
        bias = bias[None]
    elif case == "scalar bias":
        bias = torch.tensor(0.5)
    elif case == "k = 0":
        a, b = torch.randn(300, 0), torch.randn(0, 300)
    else:
        a = torch.randn(0, 300)
    assert not products.addmm.fits(bias, a, b)
    assert torch.equal(products.addmm(bias, a, b), torch.addmm(bias, a, b))
    assert products.addmm.pick([choice.signature(t) for t in (bias, a, b)], lambda: ((bias, a, b), {})) \
        is products.mkl_addmm
    assert not choice_file.exists()  # nothing measured, nothing kept


def _lines(path) -> list[dict]:
    """The file's lines as JSON; blank ones left out (a line is begun on a new line after
    one that looked cut short, which a line still being appended by another process can)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _file(path, *entries: tuple[str, str], header: bool = True) -> None:
    lines = [{"graphdl choices": 1, "machine": "test"}] if header else []
    path.write_text("".join(json.dumps(e) + "\n" for e in lines + [{"kernel": k, "way": w} for k, w in entries]))


def _words(name: str, x: torch.Tensor) -> str:
    return f"{name} {choice._words((torch.get_num_threads(), choice.signature(x)))}"


def _counting(calls: list[str]):
    def first(x):
        calls.append("first")
        return x * 2

    def second(x):
        calls.append("second")
        return x + x
    return first, second


def test_a_choice_is_kept_in_the_file_and_taken_from_it(choice_file):
    calls: list[str] = []
    kernel = choice.Fastest("test: kept", *_counting(calls), exact=False)
    x = torch.ones(3)
    kernel(x)
    header, entry = _lines(choice_file)
    assert header == {"graphdl choices": 1, "machine": choice.machine()}
    assert entry["kernel"] == _words("test: kept", x) and "float32[3]/1@cpu" in entry["kernel"]
    assert entry["way"] in ("first", "second")
    # Another process (a fresh kernel and file reader) takes the kept way, timing nothing:
    # even the slower one, when the file says so.
    other = "second" if entry["way"] == "first" else "first"
    _file(choice_file, (entry["kernel"], other))
    choice._KEPT = choice._Kept()
    kernel = choice.Fastest("test: kept", *_counting(calls), exact=False)
    calls.clear()
    kernel(x)
    assert calls == [other]


def test_the_first_line_for_a_signature_is_its_choice_and_bad_lines_are_skipped(choice_file):
    calls: list[str] = []
    x = torch.ones(3)
    words = _words("test: first", x)
    deep = "[" * 100_000 + "]" * 100_000  # deeper than json reads (RecursionError)
    _file(choice_file, ("test: other", "first"))
    with open(choice_file, "a") as f:
        f.write("not json\n" + deep + "\n" + json.dumps({"kernel": words, "way": 3}) + "\n"
                + json.dumps({"kernel": words, "way": "second"}) + "\n"
                + json.dumps({"kernel": words, "way": "first"}) + "\n" + '{"kernel": "torn')
    kernel = choice.Fastest("test: first", *_counting(calls), exact=False)
    kernel(x)
    assert calls == ["second"]


@pytest.mark.parametrize("content", ["not json{\n", json.dumps([1, 2]) + "\n", "\n", "", "\x00\xff" * 10,
                                     json.dumps({"graphdl choices": 2}) + "\n"])
def test_a_file_that_is_not_a_choice_file_is_measured_over_and_begun_afresh(choice_file, content):
    choice_file.write_text(content, encoding="latin-1")
    kernel = choice.Fastest("test: afresh", lambda x: x + 1, lambda x: 1 + x, exact=False)
    assert torch.equal(kernel(torch.zeros(2)), torch.ones(2))
    header, entry = _lines(choice_file)
    assert header["graphdl choices"] == 1 and set(entry) == {"kernel", "way"}
    assert [p.name for p in choice_file.parent.iterdir()] == [choice_file.name]  # no temporary file left


def test_a_line_naming_no_way_is_passed_over_for_the_next(choice_file):
    """A line whose way is none of the kernel's (a renamed way, an edit) is skipped: the
    next line for the signature is the choice, in every process."""
    calls: list[str] = []
    x = torch.zeros(2)
    _file(choice_file, (_words("test: unknown", x), "os.system"), (_words("test: unknown", x), "second"))
    for _ in range(2):  # two processes: each takes "second", timing nothing
        choice._KEPT = choice._Kept()
        choice.Fastest("test: unknown", *_counting(calls), exact=False)(x)
    assert calls == ["second", "second"]


def test_a_file_replaced_under_a_running_process_is_read_afresh(choice_file):
    calls: list[str] = []
    x = torch.zeros(2)
    _file(choice_file, *[(f"test: filler {k}", "first") for k in range(50)])
    choice._KEPT._load()  # this process has read the first file to its end
    _file(choice_file, (_words("test: replaced", x), "second"))  # another process's, shorter
    choice.Fastest("test: replaced", *_counting(calls), exact=False)(x)
    assert calls == ["second"]


def test_a_file_deleted_under_a_running_process_is_begun_with_its_choices(choice_file):
    calls: list[str] = []
    kernel = choice.Fastest("test: deleted", *_counting(calls), exact=False)
    kernel(torch.zeros(2))
    made = _lines(choice_file)[1]
    choice_file.unlink()  # (what "delete the file to measure again" does)
    kernel(torch.zeros(3))
    kept = {e["kernel"]: e["way"] for e in _lines(choice_file)[1:]}
    assert kept[made["kernel"]] == made["way"] and len(kept) == 2  # this process's first choice outlives it


def test_a_line_after_one_cut_short_is_a_line_of_its_own(choice_file):
    calls: list[str] = []
    x = torch.zeros(2)
    _file(choice_file)
    with open(choice_file, "a") as f:
        f.write('{"kernel": "test: torn", "wa')  # a write cut short: no newline
    choice.Fastest("test: after torn", *_counting(calls), exact=False)(x)
    first_process = calls[-1]
    choice._KEPT = choice._Kept()
    calls.clear()
    choice.Fastest("test: after torn", *_counting(calls), exact=False)(x)  # the next process takes it, untimed
    assert calls == [first_process]
    *_, torn, last = choice_file.read_text().splitlines()
    assert torn.endswith('"wa') and json.loads(last)["kernel"] == _words("test: after torn", x)


def test_a_new_choice_file_is_readable_by_all_and_a_link_to_it_stays_a_link(tmp_path, monkeypatch):
    target, link = tmp_path / "real.jsonl", tmp_path / "link.jsonl"
    link.symlink_to(target)  # dangling until the first choice
    monkeypatch.setenv("GRAPHDL_CHOICES", str(link))
    monkeypatch.setattr(choice, "_KEPT", choice._Kept())
    choice.Fastest("test: link", lambda x: x + 1, lambda x: 1 + x, exact=False)(torch.zeros(2))
    assert link.is_symlink() and len(_lines(target)) == 2
    assert target.stat().st_mode & 0o444 == 0o444


@pytest.mark.parametrize("where", ["under a file", "a directory"])
def test_an_unwritable_choice_file_warns_once_and_the_choices_hold_for_the_process(tmp_path, monkeypatch, where):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    path = blocker / "choices.jsonl" if where == "under a file" else tmp_path
    monkeypatch.setenv("GRAPHDL_CHOICES", str(path))
    monkeypatch.setattr(choice, "_KEPT", choice._Kept())
    kernel = choice.Fastest("test: unwritable", lambda x: x + 1, lambda x: 1 + x, exact=False)
    with pytest.warns(RuntimeWarning, match="could not keep its kernel choices.*GRAPHDL_KERNELS=default"):
        kernel(torch.zeros(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernel(torch.zeros(3))  # another signature: no second warning
    assert len(kernel.chosen()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a file"]  # no temporary file left


def test_a_full_choice_file_keeps_what_it_holds_and_takes_no_more(choice_file, monkeypatch):
    monkeypatch.setattr(choice, "MAX_KEPT", 3)
    kernel = choice.Fastest("test: full", lambda x: x + 1, lambda x: 1 + x, exact=False)
    kernel(torch.zeros(1))
    kernel(torch.zeros(2))
    with pytest.warns(RuntimeWarning, match="holds 3 choices already; delete it"):
        kernel(torch.zeros(3))
    assert len(_lines(choice_file)) == 3


def test_the_choice_file_lives_in_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("GRAPHDL_CHOICES")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = choice._Kept().file()
    assert path.parent == tmp_path / "graphdl" and path.name.startswith("choices-") and path.suffix == ".jsonl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setattr(choice.Path, "home", lambda: (_ for _ in ()).throw(RuntimeError("no home")))
    assert choice._Kept().file().parent.parent == choice.Path(choice.tempfile.gettempdir())


def test_another_process_choice_made_meanwhile_stands(choice_file):
    """Two processes choosing at once: the one whose line comes second takes the first's way."""
    def first(x):
        return x + 1

    def second(x):
        return 1 + x
    x = torch.zeros(2)
    words = _words("test: race", x)
    kernel = choice.Fastest("test: race", first, second, exact=False)
    _file(choice_file)
    choice._KEPT._load()  # this process read the file before the other wrote
    with open(choice_file, "a") as f:
        f.write(json.dumps({"kernel": words, "way": "second"}) + "\n")
    assert choice._KEPT.put(words, first, kernel.ways) is second
    assert [e.get("way") for e in _lines(choice_file)[1:]] == ["second"]


RACE = textwrap.dedent("""
    import json, sys, time, torch
    from graphdl.ops import choice
    prefer, start = int(sys.argv[1]), float(sys.argv[2])
    def first(x): return x + 1
    def second(x): return 1 + x
    kernel = choice.Fastest("test: racing", first, second, exact=False)
    time.sleep(max(0.0, start - time.time()))  # all four begin at once
    took = {}
    for n in range(1, 61):
        words = f"test: racing {choice._words((torch.get_num_threads(), choice.signature(torch.zeros(n))))}"
        way = choice._KEPT.get(words, kernel.ways) or choice._KEPT.put(words, (first, second)[prefer], kernel.ways)
        took[words] = way.__name__
    print(json.dumps(took))
""")


def test_processes_choosing_at_once_agree(tmp_path):
    """Four processes make the same 60 choices at once, two preferring each way: each
    takes, for each signature, the way whose line came first, the same in all four."""
    env = {**os.environ, "GRAPHDL_CHOICES": str(tmp_path / "choices.jsonl")}
    start = str(time.time() + 4)
    runs = [subprocess.Popen([sys.executable, "-c", RACE, str(k % 2), start], env=env, stdout=subprocess.PIPE,
                             text=True) for k in range(4)]
    took = [json.loads(r.communicate(timeout=120)[0]) for r in runs]
    assert all(r.returncode == 0 for r in runs)
    first_lines: dict[str, str] = {}
    for entry in _lines(tmp_path / "choices.jsonl")[1:]:
        first_lines.setdefault(entry["kernel"], entry["way"])
    assert len(first_lines) == 60 and all(t == first_lines for t in took)


def test_default_kernels_take_torch_own_and_keep_nothing(choice_file, monkeypatch):
    monkeypatch.setenv("GRAPHDL_KERNELS", "default")
    a, b = torch.randn(300, 300), torch.randn(300, 300)
    assert products.mm.pick([choice.signature(a), choice.signature(b)], lambda: ((a, b), {})) is products.mkl_mm
    assert not choice_file.exists()


# -- training with either kernel -----------------------------------------------------------


def _forced(monkeypatch, way: int) -> None:
    """Every product takes way `way` where it can (0: torch's, 1: oneDNN's)."""
    for kernel in (products.mm, products.addmm, products.addmm_tanh):
        monkeypatch.setattr(kernel, "_decide", lambda key, args, kwargs, k=kernel:
                            k.ways[way] if way == 0 or k.fits(*args, **kwargs) else k.ways[0])
        monkeypatch.setattr(kernel, "_chosen", {})


def _torch_trajectory(layers, X, Y, batch: int, steps: int) -> list[float]:
    mods = [m for (w, _) in layers for m in (torch.nn.Linear(*w.shape), torch.nn.Tanh())][:-1]
    torch_model = torch.nn.Sequential(*mods)
    with torch.no_grad():
        for lin, (w, b) in zip(torch_model[::2], layers):
            lin.weight.copy_(w.t())
            lin.bias.copy_(b)
    opt = torch.optim.SGD(torch_model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for i in range(steps):
        x, y = X[i * batch:(i + 1) * batch], Y[i * batch:(i + 1) * batch]
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(torch_model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@needs_onednn
@pytest.mark.parametrize("way", [0, 1])
def test_training_with_either_kernel_follows_pytorch(monkeypatch, way):
    """A 2-64-64-1 tanh net trained step by step with every product on torch's kernel, then
    on oneDNN's: the losses follow PyTorch's to float32 rounding, the weights too."""
    _forced(monkeypatch, way)
    gen = torch.Generator().manual_seed(0)
    sizes = [(2, 64), (64, 64), (64, 1)]
    layers = [(torch.randn(i, o, generator=gen) / i**0.5, torch.randn(o, generator=gen) * 0.1) for i, o in sizes]
    X, Y = torch.randn(64 * 6, 2, generator=gen), torch.randn(64 * 6, 1, generator=gen)
    mods = []
    for k, (w, b) in enumerate(layers):
        lin = gd.Linear(*w.shape)
        lin.weight, lin.bias = w.clone(), b.clone()
        mods += [lin, gd.Tanh()] if k < len(layers) - 1 else [lin]
    model = gd.Sequential(*mods)
    step = gd.TrainStep(model, gd.MSE(), gd.SGD(lr=0.05, momentum=0.9))
    losses = [step(X[i * 64:(i + 1) * 64], Y[i * 64:(i + 1) * 64], 0.05).item() for i in range(6)]
    wanted = set(choice.chosen()["addmm_tanh"].values())
    assert wanted == {products.addmm_tanh.ways[way].__name__}
    torch.testing.assert_close(losses, _torch_trajectory(layers, X, Y, 64, 6), rtol=2e-5, atol=1e-6)


SAME_BITS = textwrap.dedent("""
    import sys, torch, graphdl as gd
    torch.manual_seed(0)
    model = gd.Sequential(gd.Linear(2, 256), gd.Tanh(), gd.Linear(256, 256), gd.Tanh(), gd.Linear(256, 1))
    X, Y = torch.randn(512, 2), torch.randn(512, 1)
    model.fit(X, Y, loss=gd.MSE(), optimizer=gd.SGD(lr=0.01, momentum=0.9), epochs=2, batch_size=256,
              verbose=False, threads=1)
    torch.save([p.clone() for p in model.parameters().values()], sys.argv[1])
""")


def test_two_runs_on_one_machine_give_the_same_bits(tmp_path):
    """Each run is a process of its own, sharing the machine's choice file: the second
    takes the first's kernels, so the trained weights are equal to the bit."""
    env = {**os.environ, "GRAPHDL_CHOICES": str(tmp_path / "choices.jsonl")}
    env.pop("GRAPHDL_KERNELS", None)
    runs = []
    for k in range(2):
        out = tmp_path / f"run{k}.pt"
        subprocess.run([sys.executable, "-c", SAME_BITS, str(out)], env=env, check=True, timeout=120)
        runs.append(torch.load(out))
    assert len(_lines(tmp_path / "choices.jsonl")) > 1  # the first run's choices
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["strided", "transposed weight"])
def test_a_param_of_another_layout_than_the_arena_picked_for_trains_the_same(layout):
    """fit's arena picks each product's kernel for contiguous operands; a param that is a
    view of another layout (a layer's tensor assigned so) still gives the right numbers."""
    def model(view: bool) -> gd.Sequential:
        gen = torch.Generator().manual_seed(1)
        m = gd.Sequential(gd.Linear(2, 300, generator=gen), gd.Tanh(), gd.Linear(300, 300, generator=gen),
                          gd.Tanh(), gd.Linear(300, 1, generator=gen))
        if view:
            lin = m.layers[2]
            if layout == "strided":
                wide = torch.zeros(600)
                wide[::2] = lin.bias
                lin.bias = wide[::2]
            else:
                lin.weight = lin.weight.t().contiguous().t()
        return m
    X, Y = torch.randn(300, 2, generator=torch.Generator().manual_seed(2)), torch.ones(300, 1)
    losses = []
    for view in (False, True):
        step = gd.TrainStep(model(view), gd.MSE(), gd.SGD(lr=0.01))
        losses.append([step(X, Y, 0.01).item() for _ in range(3)])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)


def test_binding_an_arena_leaves_torch_random_state_alone():
    model = gd.Sequential(gd.Linear(2, 300), gd.Tanh(), gd.Linear(300, 1))
    step = gd.TrainStep(model, gd.MSE(), gd.SGD(lr=0.01))
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    step(torch.ones(300, 2), torch.ones(300, 1), 0.01)  # binds an arena: its products' kernels picked
    assert torch.equal(torch.random.get_rng_state(), state)
