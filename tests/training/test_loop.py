import numpy as np
import pytest
import torch

from segkit.config import validate_recipe
from segkit.demo import SAMPLE_LABELS, SAMPLE_RAW
from segkit.errors import SegkitError
from segkit.normalization import intensity_scale
from segkit.training.losses import segmentation_loss, weighted_cross_entropy
from segkit.training.patches import pad_examples, sample_patch
from segkit.training.targets import LabelRule, class_weights, weight_map
from tests.helpers import tiny_recipe


def test_border_weights_peak_between_touching_cells():
    membrane = np.zeros((40, 60), bool)
    membrane[:, 29:31] = True  # a 2 px membrane between two cells
    membrane[:, :2] = True
    labels = (~membrane).astype(np.uint8)  # ISBI: 0 = membrane
    w = weight_map(labels, LabelRule().target(labels), LabelRule(), [0.0, 0.0], w0=10, sigma=5)  # border term only
    assert w[~membrane].max() == 0
    # between the cells d1 + d2 is 3 px (2 + 1) -> 10 exp(-9/50)
    assert w[20, 29] == pytest.approx(10 * np.exp(-9 / 50), rel=1e-4)
    assert w[20, 0] < 1e-2  # border of a single cell: no second cell near


def test_class_balance_weights():
    membrane = np.zeros(100, bool)
    membrane[:20] = True
    interior, membrane_w = class_weights([membrane.astype(np.uint8)], 2)
    assert interior * 80 == pytest.approx(membrane_w * 20)


def test_weighted_ce_matches_manual():
    logits = torch.randn(2, 2, 5, 5)
    target = torch.randint(0, 2, (2, 5, 5))
    weight = torch.rand(2, 5, 5)
    manual = -(torch.log_softmax(logits, 1).gather(1, target[:, None])[:, 0] * weight).mean()
    assert weighted_cross_entropy(logits, target, weight) == pytest.approx(manual.item(), rel=1e-5)


def _membrane_slices(raw: list, membrane: list, *, margin: int, min_size: int, balance: list, w0: float, sigma: float):
    """ISBI-style raw planes and boolean membranes as training's SliceSet (raw in [0, 1] units), as train() builds it."""
    rule, scale = LabelRule(), intensity_scale(raw[0].dtype)
    labels = [(~m).astype(np.uint8) for m in membrane]
    targets = [rule.target(lab) for lab in labels]
    weights = [weight_map(lab, t, rule, balance, w0=w0, sigma=sigma) for lab, t in zip(labels, targets)]
    return pad_examples([r.astype(np.float32) / scale for r in raw], targets, weights, margin=margin,
                        min_size=min_size, scale=scale)


def test_patches_have_context_and_targets():
    rng = np.random.default_rng(0)
    raw = [rng.integers(0, 255, (60, 70), dtype=np.uint8)]
    membrane = [rng.random((60, 70)) < 0.3]
    slices = _membrane_slices(raw, membrane, margin=92, min_size=20, balance=[1.0, 2.0], w0=10, sigma=5)
    image, target, weight = sample_patch(slices, rng, tile=204, out_tile=20, augment=None)
    assert image.shape == (1, 204, 204) and target.shape == (20, 20) and weight.shape == (20, 20)
    assert 0 <= image.min() and image.max() <= 1 and set(np.unique(target)) <= {0, 1}


def test_training_lowers_the_loss():
    from segkit.models import create_model
    from segkit.training.patches import build_augmentation

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    import tifffile

    raw = list(tifffile.imread(SAMPLE_RAW)[:2])
    membrane = list(tifffile.imread(SAMPLE_LABELS)[:2] == 0)
    slices = _membrane_slices(raw, membrane, margin=92, min_size=52, balance=[0.6, 2.3], w0=10, sigma=5)
    batch = [sample_patch(slices, rng, tile=236, out_tile=52, augment=build_augmentation(
        validate_recipe({})["augment"], seed=0)) for _ in range(2)]
    x = torch.from_numpy(np.stack([(b[0] - 0.5) / 0.2 for b in batch]))
    y = torch.from_numpy(np.stack([b[1] for b in batch]))
    w = torch.from_numpy(np.stack([b[2] for b in batch]))
    model = create_model("unet", base=4, batch_norm=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = segmentation_loss(model(x), y, w, dice_weight=0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_train_run_writes_everything_and_resumes(tmp_path, monkeypatch):
    from segkit.checkpoint import load_model
    from segkit.training import loop
    from segkit.training.loop import train

    asked, messages = [], []
    precision = loop.training_precision
    monkeypatch.setattr(loop, "training_precision", lambda enabled, device: (asked.append(enabled),
                                                                             precision(enabled, device))[1])
    files = train(tiny_recipe(tmp_path), progress=False, echo=messages.append)
    # train.amp left out (null, which training_precision takes as on: autocast where there is a GPU), and no note
    # on the CPU (issue 25)
    assert asked == [None] and not [m for m in messages if "train.amp" in m]
    for path in (files.best, files.last, files.optimizer, files.log_csv, files.log_json, files.curve, files.recipe):
        assert path.exists(), path
    model, info = load_model(files.best)
    assert info.training["epoch"] >= 1 and "adapted_rand_error" in info.training["validation"]
    assert info.inference.threshold in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    assert info.normalization.std > 0
    with pytest.raises(SegkitError, match="pass resume=True"):
        train(tiny_recipe(tmp_path), progress=False, echo=lambda _: None)
    train(tiny_recipe(tmp_path, epochs=3, workers=1), resume=True, progress=False, echo=lambda _: None)
    with pytest.raises(SegkitError, match="not this recipe's"):
        train(tiny_recipe(tmp_path, base=8, epochs=4), resume=True, progress=False, echo=lambda _: None)
    lines = files.log_csv.read_text().strip().splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == ["1", "2", "3"]


def test_staged_fcn_training_through_recipes(tmp_path):
    """FCN-32s trains (blended validation), then FCN-16s starts from it via model.init_from."""
    from segkit.checkpoint import load_model
    from segkit.training.loop import train

    def recipe(variant, out, init_from=None):
        r = tiny_recipe(tmp_path, epochs=1, out=str(tmp_path / out))
        r["model"] = {"name": f"fcn{variant}", "params": {"width": 4, "fc": 16, "halo": 16},
                      "pretrained": None, "init_from": init_from, "denoiser": None}
        r["data"]["tile"] = 96
        return r

    first = train(recipe("32s", "s32"), progress=False, echo=lambda _: None)
    messages = []
    second = train(recipe("16s", "s16", init_from=str(first.best)), progress=False, echo=messages.append)
    assert any("initialised" in m for m in messages)
    model, info = load_model(second.best)
    assert info.model == "fcn16s" and info.geometry.halo == 16 and info.inference.tile == 96
    with pytest.raises(SegkitError, match="has no pretrained backbone"):
        r = tiny_recipe(tmp_path, out=str(tmp_path / "u"))
        r["model"]["pretrained"] = "x.pth"
        train(r, progress=False, echo=lambda _: None)


def test_optimizer_step_refuses_a_loss_that_is_not_finite():
    import torch

    from segkit.devices import training_precision as amp_setup
    from segkit.errors import SegkitError
    from segkit.training.runs import optimizer_step

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    _, scaler = amp_setup(False, "cpu")
    assert optimizer_step((weight * 2).sum(), optimizer, scaler, epoch=1) == pytest.approx(6.0)
    assert torch.allclose(weight.detach(), torch.full((3,), 0.8))  # the step was taken
    with pytest.raises(SegkitError, match="loss became nan at epoch 3; lower train.lr"):
        optimizer_step((weight * float("nan")).sum(), optimizer, scaler, epoch=3)


def test_training_with_augmentation_on_the_device(tmp_path):
    """augment.on_device: patches are augmented, cropped and normalised where the model trains."""
    from segkit.checkpoint import read_info
    from segkit.training.loop import train

    recipe = tiny_recipe(tmp_path, epochs=1)
    recipe["augment"]["on_device"] = True
    files = train(recipe, progress=False, echo=lambda _: None)
    assert read_info(files.best).training["epoch"] == 1


def test_training_without_matplotlib_skips_the_curve_and_says_so_once(tmp_path, monkeypatch):
    """matplotlib is optional (the plot extra): training finishes, writes everything but the curve, and
    one line says why."""
    import sys

    from segkit.training.loop import train

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    lines = []
    files = train(tiny_recipe(tmp_path, epochs=2), progress=False, echo=lines.append)
    for path in (files.best, files.last, files.optimizer, files.log_csv, files.log_json, files.recipe):
        assert path.exists(), path
    assert not files.curve.exists()
    notes = [line for line in lines if "matplotlib" in line]
    assert notes == ["note: matplotlib is not installed, so curve.png is skipped "
                     "(pip install matplotlib, or the segkit-bio[plot] extra, draws it)"]


@pytest.mark.parametrize("amp, mode", [(None, "auto"), (True, "auto"), (False, "none")])
def test_an_unset_train_amp_is_autocast_where_it_applies(monkeypatch, amp, mode):
    """`train.amp` unset (null) asks for the same precision as true: autocast on a GPU (a no-op on the CPU)."""
    from segkit import devices

    asked = []
    monkeypatch.setattr(devices, "resolve_amp", lambda wanted, device: (asked.append(wanted), "none")[1])
    devices.training_precision(amp, "cuda:0")
    assert asked == [mode]
