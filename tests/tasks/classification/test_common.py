"""What digits and CIFAR-10 share (prunq.tasks.classification.common): seeded augmentation, a selection split
drawn from the training images (never the test split), top-1 scoring. Tiny tasks over hand-made tensors whose
image ``k`` is filled with the value ``k``, so a model can read which image it sees."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunq.core.errors import PrunqError
from prunq.tasks.classification.common import ClassificationTask, mixed_seed, model_device, random_crop, random_hflip


class _Tiny(ClassificationTask):
    name = "tiny"
    default_model = "digits_cnn"
    model_names = ("digits_cnn",)
    num_classes = 4
    eval_batch_size = 2


def _images(values: torch.Tensor) -> torch.Tensor:
    return values.float().reshape(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()


def _tiny(n_train: int = 20, seed: int = 0) -> _Tiny:
    """Training images 0..n-1, test images 100..104; the label of image k is k % 4."""
    train, test = torch.arange(n_train), 100 + torch.arange(5)
    return _Tiny(_images(train), train % 4, _images(test), test % 4, seed=seed)


class _Oracle(nn.Module):
    """Reads k from the image; predicts k % 4 (right) where ``right(k)``, else (k + 1) % 4 (wrong)."""

    def __init__(self, right) -> None:
        super().__init__()
        self.right = right
        self.bn = nn.BatchNorm2d(1)  # a mode to restore

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x.mean(dim=(1, 2, 3)).round().long()
        pred = torch.where(self.right(k), k % 4, (k + 1) % 4)
        return 10.0 * F.one_hot(pred, 4).float()


def test_random_crop_and_flip_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6) + 1
    out = random_crop(x, 2, g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):  # each sample is one window of its zero-padded image, all channels alike
        windows = [padded[i, :, r : r + 6, c : c + 6] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    flipped = random_hflip(x, g)
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))


@pytest.mark.parametrize(("n", "size"), [(20, 4), (13, 3), (7, 1), (2, 1)])  # round(0.2 n), at least 1
def test_val_indices_are_a_fixed_seeded_sample_of_the_training_split(n, size):
    task = _tiny(n)
    idx = task.val_indices()
    assert idx.dtype == torch.int64 and len(idx) == size
    assert idx.tolist() == sorted(set(idx.tolist())) and 0 <= int(idx.min()) and int(idx.max()) < n
    assert torch.equal(task.val_indices(), idx) and torch.equal(_tiny(n).val_indices(), idx)  # deterministic


def test_val_indices_follow_the_task_seed_and_val_fraction():
    assert not torch.equal(_tiny(200, seed=0).val_indices(), _tiny(200, seed=1).val_indices())

    class Half(_Tiny):
        val_fraction = 0.5

    train = torch.arange(20)
    assert len(Half(_images(train), train % 4, _images(train[:2]), train[:2] % 4).val_indices()) == 10


def test_validate_scores_the_training_sample_and_evaluate_the_test_split():
    task = _tiny(20)
    test_only = _Oracle(lambda k: k >= 100).train()  # right exactly on the test images
    assert task.evaluate(test_only) == pytest.approx({"metric": 1.0, "loss": 0.0, "n": 5}, abs=1e-3)
    val = task.validate(test_only)
    assert (val["metric"], val["n"]) == (0.0, 4) and val["loss"] > 9.0  # every logit of the truth 10 below
    assert test_only.training and test_only.bn.training  # modes restored
    even = _Oracle(lambda k: (k >= 100) | (k % 2 == 0))  # also right on the even training images
    idx = task.val_indices()
    assert task.validate(even)["metric"] == pytest.approx(float((idx % 2 == 0).float().mean()))


def test_test_split_in_order_and_in_eval_batches():
    task = _tiny(20)
    batches = list(task.test_batches())
    assert [len(y) for _, y in batches] == [2, 2, 1]  # eval_batch_size 2
    assert torch.cat([y for _, y in batches]).tolist() == [0, 1, 2, 3, 0]  # 100..104 % 4, in order
    assert torch.equal(task.example_inputs()[0], task.x_test[:1])
    assert repr(task) == "_Tiny(train=20, test=5, input=(1, 2, 2), seed=0)"


def test_models_get_the_datas_channels_and_classes():
    task = _tiny()
    assert task.model_kwargs("digits_cnn", width=0.5) == {"in_channels": 1, "num_classes": 4, "width": 0.5}
    assert task.model_kwargs(num_classes=7)["num_classes"] == 7  # an explicit value wins
    assert task.build_model(width=0.25)(torch.zeros(3, 1, 8, 8)).shape == (3, 4)  # default_model
    unknown = r"model\.name: unknown model 'resnet20' for task 'tiny' \(choose from digits_cnn\)"
    with pytest.raises(PrunqError, match=unknown):
        task.build_model("resnet20")
    with pytest.raises(ValueError, match="differ in length"):
        _Tiny(torch.zeros(3, 1, 2, 2), torch.zeros(2), torch.zeros(1, 1, 2, 2), torch.zeros(1))


def test_mixed_seed_and_model_device():
    assert mixed_seed(1, 2) == mixed_seed(1, 2) != mixed_seed(2, 1)  # order matters, unlike a sum
    assert mixed_seed(0, 7) != mixed_seed(7, 0) and mixed_seed(3, 4) != mixed_seed(3, 5)
    assert all(0 <= mixed_seed(*s) < 2**63 for s in [(-1, 5), (2**70, 3), (0,)])  # negative and huge are fine
    assert model_device(nn.ReLU()) == torch.device("cpu")  # no parameter, no buffer
    assert model_device(nn.BatchNorm1d(2)) == torch.device("cpu")


def test_mixed_seed_does_not_collide_across_word_boundaries():
    assert mixed_seed(2**32, 0) != mixed_seed(0, 1)
