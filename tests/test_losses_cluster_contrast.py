"""ClusterNCE and the cluster memory against hand-written references: the loss, its gradient, both updates."""

import math

import pytest
import torch
import torch.nn.functional as F

from dino_recog.losses import ClusterMemory, cluster_centroids


def reference_loss(x: torch.Tensor, memory: torch.Tensor, labels: list[int], tau: float) -> float:
    """-1/B sum_i log(exp(q_i.M[y_i]/tau) / sum_c exp(q_i.M[c]/tau)), written out with Python loops."""
    total = 0.0
    for i, y in enumerate(labels):
        q = x[i] / math.sqrt(sum(v * v for v in x[i].tolist()))
        logits = [float(q @ memory[c]) / tau for c in range(len(memory))]
        total += -logits[y] + math.log(sum(math.exp(v) for v in logits))
    return total / len(labels)


def reference_grad(x: torch.Tensor, memory: torch.Tensor, labels: list[int], tau: float) -> torch.Tensor:
    """dL/dx: dL/dq_i = (sum_c p_ic M[c] - M[y_i]) / (tau B), through q = x / |x|: (I - q q^T) / |x|."""
    grad = torch.zeros_like(x)
    for i, y in enumerate(labels):
        norm = x[i].norm()
        q = x[i] / norm
        p = torch.softmax(memory @ q / tau, 0)
        dq = (p @ memory - memory[y]) / (tau * len(labels))
        grad[i] = (dq - q * (q @ dq)) / norm
    return grad


def test_loss_and_gradient_equal_the_reference():
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    memory = F.normalize(torch.randn(4, 5, dtype=torch.float64), dim=1)
    labels = [0, 0, 1, 3, 3, 2]
    m = ClusterMemory(5, temperature=0.05).double()  # the reference's precision
    m.reset(memory)
    loss = m(x, torch.tensor(labels))
    assert loss.item() == pytest.approx(reference_loss(x.detach(), memory, labels, 0.05), rel=1e-10)
    loss.backward()
    torch.testing.assert_close(x.grad, reference_grad(x.detach(), memory, labels, 0.05), rtol=1e-9, atol=1e-12)
    assert m.features.grad is None and not m.features.requires_grad  # the memory is not trained by gradients


def test_the_loss_leaves_its_inputs_and_the_memory_unchanged():
    torch.manual_seed(1)
    x = torch.randn(4, 3)
    m = ClusterMemory(3)
    m.reset(torch.randn(2, 3))
    before, mem = x.clone(), m.features.clone()
    m(x, torch.tensor([0, 1, 1, 0]))
    assert torch.equal(x, before) and torch.equal(m.features, mem)  # the update waits for update()
    with pytest.raises(RuntimeError, match="before reset"):
        ClusterMemory(3)(x, torch.tensor([0, 0, 0, 0]))


def test_centroids_are_the_normalised_means_of_the_normalised_features():
    f = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0], [5.0, 5.0]])
    c = cluster_centroids(f, torch.tensor([0, 0, -1, 1]), 2)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(c, torch.tensor([[s, s], [s, s]]))  # (1, 0) + (0, 1), normalised; the outlier is out


def _normalised(v: list[float]) -> list[float]:
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


@pytest.mark.parametrize("hard", [False, True])
def test_momentum_update_equals_the_reference(hard):
    """Instance: every sample in batch order; hard: each cluster once, with its least similar sample."""
    torch.manual_seed(2)
    memory = F.normalize(torch.randn(3, 4, dtype=torch.float64), dim=1)
    x = torch.randn(5, 4, dtype=torch.float64)
    labels = [2, 0, 2, 2, 0]
    m = ClusterMemory(4, momentum=0.2, hard=hard).double()
    m.reset(memory)
    m(x, torch.tensor(labels))
    m.update()
    q = [_normalised(r) for r in x.tolist()]
    ref = memory.tolist()
    if hard:
        for c in sorted(set(labels)):
            members = [i for i, y in enumerate(labels) if y == c]
            h = min(members, key=lambda i: sum(a * b for a, b in zip(q[i], ref[c])))
            ref[c] = _normalised([0.2 * a + 0.8 * b for a, b in zip(ref[c], q[h])])
    else:
        for i, c in enumerate(labels):
            ref[c] = _normalised([0.2 * a + 0.8 * b for a, b in zip(ref[c], q[i])])
    torch.testing.assert_close(m.features, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert torch.equal(m.features[1], memory[1])  # a cluster without a sample in the batch keeps its centroid
    assert not m.pending  # applied once
    m.update()
    torch.testing.assert_close(m.features, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_hard_and_instance_updates_differ():
    """Sanity of the parametrised test above: with two samples of one cluster the two rules give other centroids."""
    memory = torch.tensor([[1.0, 0.0]])
    x = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    out = []
    for hard in (False, True):
        m = ClusterMemory(2, hard=hard)
        m.reset(memory)
        m(x, torch.tensor([0, 0]))
        m.update()
        out.append(m.features.clone())
    torch.testing.assert_close(out[1], F.normalize(torch.tensor([[0.2, 0.8]]), dim=1))  # (0, 1) is the hardest
    assert not torch.allclose(out[0], out[1])


def test_restore_keeps_the_rows_bit_for_bit():
    """A checkpoint's memory comes back as it was; `reset` normalises, which can change the last bits of rows that
    were normalised already (a resumed run would then drift from the uninterrupted one)."""
    torch.manual_seed(3)
    rows = F.normalize(torch.randn(50, 7), dim=1)
    m = ClusterMemory(7)
    m.restore(rows)
    assert torch.equal(m.features, rows)
    m.reset(rows)
    assert not torch.equal(m.features, rows)  # the case restore exists for
