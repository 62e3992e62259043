"""Token-weighted LM loss, token log-probs, accuracy counts and the DPO loss on hand-computed numbers."""

import pytest
import torch
import torch.nn.functional as F

from ironcore.objectives import (
    dpo_loss,
    dpo_reward_metrics,
    lm_loss_sum,
    sequence_logps,
    token_accuracy_counts,
    token_logprobs,
)

V = 11


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """4 rows of 12 positions: right padding of different lengths and an SFT-style masked prompt in row 2."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 12, V, generator=g) * 3
    labels = torch.randint(0, V, (4, 12), generator=g)
    for row, length in enumerate((12, 5, 9, 3)):
        labels[row, length:] = -100
    labels[2, :6] = -100
    return logits, labels


def test_token_weighted_loss_over_chunks_equals_full_batch_mean():
    logits, labels = padded_batch()
    full_mean = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    chunks = [(0, 1), (1, 3), (3, 4)]
    sums, counts = zip(*(lm_loss_sum(logits[a:b], labels[a:b]) for a, b in chunks), strict=True)
    assert int(sum(counts)) == 11 + 4 + 3 + 2
    assert (sum(sums) / sum(counts)).item() == pytest.approx(full_mean.item(), abs=1e-6)
    # averaging per-chunk means instead would weight the short rows up: the test can tell the two apart
    mean_of_means = sum(s / c for s, c in zip(sums, counts, strict=True)) / len(chunks)
    assert abs(mean_of_means.item() - full_mean.item()) > 1e-2


def test_token_logprobs_shift_mask_and_fp32():
    logits, labels = padded_batch(1)
    logp, mask = token_logprobs(logits.bfloat16(), labels)
    assert logp.shape == mask.shape == (4, 11) and logp.dtype == torch.float32
    ref = torch.log_softmax(logits.bfloat16().float(), -1)
    for b in range(4):
        for t in range(11):
            if labels[b, t + 1] == -100:
                assert not mask[b, t] and logp[b, t] == 0.0
            else:
                assert mask[b, t] and logp[b, t].item() == pytest.approx(ref[b, t, labels[b, t + 1]].item(), abs=1e-6)
    loss_sum, n = lm_loss_sum(logits, labels)
    logp32, _ = token_logprobs(logits, labels)
    assert loss_sum.item() == pytest.approx(-logp32.sum().item(), rel=1e-6)
    assert int(n) == int(mask.sum())
    torch.testing.assert_close(sequence_logps(logits, labels), logp32.sum(-1))


def test_all_ignored_batch_gives_zero_sum_and_zero_count():
    logits, labels = padded_batch()
    loss_sum, n = lm_loss_sum(logits, torch.full_like(labels, -100))
    assert loss_sum.item() == 0.0 and int(n) == 0


def test_token_accuracy_counts():
    # one row, 4 positions: predictions (argmax at t) for labels at t+1 = [2, 0, 1]; labels[1:] = [2, 1, 1]
    logits = torch.full((1, 4, 3), -5.0)
    for t, pred in enumerate((2, 0, 1, 0)):
        logits[0, t, pred] = 5.0
    labels = torch.tensor([[0, 2, 1, 1]])
    assert [int(x) for x in token_accuracy_counts(logits, labels)] == [2, 3]
    labels[0, 3] = -100
    assert [int(x) for x in token_accuracy_counts(logits, labels)] == [1, 2]


def test_dpo_loss_hand_computed():
    policy_chosen = torch.tensor([-10.0, -12.0])
    policy_rejected = torch.tensor([-14.0, -11.0])
    ref_chosen = torch.tensor([-11.0, -12.0])
    ref_rejected = torch.tensor([-13.0, -12.0])
    # log-ratios: chosen [1, 0], rejected [-1, 1]; beta * margin = [0.2, -0.1]
    # loss = -logsigmoid(z) = log(1 + exp(-z)): log(1 + e^-0.2) = 0.5981388693815918, log(1 + e^0.1) = 0.744396660073571
    loss, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1
    )
    torch.testing.assert_close(loss, torch.tensor([0.5981388693815918, 0.744396660073571]), rtol=0, atol=1e-6)
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.1, 0.0]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([-0.1, 0.1]))
    metrics = dpo_reward_metrics(chosen_rewards, rejected_rewards)
    assert metrics["rewards/accuracy"].item() == pytest.approx(0.5)
    assert metrics["rewards/margin"].item() == pytest.approx(0.05)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.05)
    assert metrics["rewards/rejected"].item() == pytest.approx(0.0, abs=1e-7)


def test_dpo_loss_gradient_flows_to_policy_only_through_loss():
    pc = torch.tensor([-3.0], requires_grad=True)
    loss, chosen_rewards, _ = dpo_loss(pc, torch.tensor([-4.0]), torch.tensor([-3.0]), torch.tensor([-4.0]), beta=0.5)
    assert not chosen_rewards.requires_grad
    loss.sum().backward()
    # d/dpc of -logsigmoid(beta * (pc - rc - pr + rr)) at 0 is -beta * sigmoid(0) = -0.25
    assert pc.grad.item() == pytest.approx(-0.25)
