"""Token-weighted LM loss, token log-probs, accuracy counts and the DPO loss on hand-computed numbers."""

import pytest
import torch
import torch.nn.functional as F

from ironcore import objectives
from ironcore.objectives import (
    ChunkedCrossEntropy,
    dpo_loss,
    dpo_reward_metrics,
    lm_loss_sum,
    sequence_logps,
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
    sums, counts, _ = zip(*(lm_loss_sum(logits[a:b], labels[a:b]) for a, b in chunks), strict=True)
    assert int(sum(counts)) == 11 + 4 + 3 + 2
    assert (sum(sums) / sum(counts)).item() == pytest.approx(full_mean.item(), abs=1e-6)
    # averaging per-chunk means instead would weight the short rows up: the test can tell the two apart
    mean_of_means = sum(s / c for s, c in zip(sums, counts, strict=True)) / len(chunks)
    assert abs(mean_of_means.item() - full_mean.item()) > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_elements", [5 * V, 2**20])  # ragged chunks of 5 rows (48 = 9 x 5 + 3); one chunk
@pytest.mark.parametrize("activation", [False, True])  # the logits a leaf, or an op's output (gradient in place)
def test_chunked_cross_entropy_equals_plain_loss_and_gradients(monkeypatch, dtype, chunk_elements, activation):
    """The training loss path against `F.cross_entropy(logits.float(), ..., reduction="sum")`, as autocast gives it:
    the same loss to fp32 rounding, the same logits gradient (fp32: to 1e-6; bf16: both round the same fp32 value to
    bf16 once, so to bf16's own tolerance), zero gradient on ignored rows, and the upstream gradient applied."""
    monkeypatch.setattr(objectives, "CPU_CHUNK_ELEMENTS", chunk_elements)
    logits, labels = padded_batch(2)
    targets = F.pad(labels[:, 1:], (0, 1), value=-100).flatten()
    flat = logits.flatten(0, 1).to(dtype)
    ours, plain = flat.clone().requires_grad_(), flat.clone().requires_grad_()
    loss, correct = ChunkedCrossEntropy.apply(ours * 1 if activation else ours, targets)
    valid = targets != -100
    assert int(correct) == int(((plain.argmax(-1) == targets) & valid).sum()) and not correct.requires_grad
    ref = F.cross_entropy(plain.float(), targets, ignore_index=-100, reduction="sum")
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    (loss * 0.37).backward()
    (ref * 0.37).backward()
    assert ours.grad.dtype == dtype
    torch.testing.assert_close(ours.grad, plain.grad, **({"rtol": 0, "atol": 1e-6} if dtype == torch.float32 else {}))
    assert ours.grad[targets == -100].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_counts_ties_as_argmax_does(monkeypatch, dtype):
    """Integer logits in [-2, 2] tie often: a row counts only where `argmax` (the first peak) is the target, never
    just because the target shares the peak; ragged chunks of 7 rows and ignored rows included."""
    monkeypatch.setattr(objectives, "CPU_CHUNK_ELEMENTS", 7 * V)
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(-2, 3, (200, V), generator=g).to(dtype)
    peaks = (logits == logits.amax(-1, keepdim=True)).float()
    targets = torch.multinomial(peaks, 1, generator=g).squeeze(1)  # a peak of each row, often not its first one
    targets[::9] = -100
    valid = targets != -100
    first_peak = logits.argmax(-1) == targets
    assert (valid & ~first_peak).sum() > 20 and (valid & first_peak).sum() > 20  # both cases are exercised
    _, correct = ChunkedCrossEntropy.apply(logits, targets)
    assert int(correct) == int((first_peak & valid).sum())


def test_lm_loss_sum_leaves_the_logits_unchanged_and_needs_no_grad():
    """fp32 chunks are views of the logits: forward never writes into them, nor does backward into a leaf's (only an
    activation's logits take their gradient in place); under no_grad (eval) the loss is a value."""
    logits, labels = padded_batch(3)
    before = logits.clone()
    with torch.no_grad():
        loss_sum, _, _ = lm_loss_sum(logits, labels)
    assert torch.equal(logits, before) and not loss_sum.requires_grad
    leaf = logits.clone().requires_grad_()
    lm_loss_sum(leaf, labels)[0].backward()
    assert torch.equal(leaf.detach(), before)


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
    loss_sum, n, _ = lm_loss_sum(logits, labels)
    logp32, _ = token_logprobs(logits, labels)
    assert loss_sum.item() == pytest.approx(-logp32.sum().item(), rel=1e-6)
    assert int(n) == int(mask.sum())
    torch.testing.assert_close(sequence_logps(logits, labels), logp32.sum(-1))


def test_all_ignored_batch_gives_zero_sum_and_zero_count():
    logits, labels = padded_batch()
    loss_sum, n, correct = lm_loss_sum(logits, torch.full_like(labels, -100))
    assert loss_sum.item() == 0.0 and int(n) == 0 and int(correct) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_accuracy_counts(dtype):
    # one row, 4 positions: predictions (argmax at t) for labels at t+1 = [2, 0, 1]; labels[1:] = [2, 1, 1]
    logits = torch.full((1, 4, 3), -5.0, dtype=dtype)
    for t, pred in enumerate((2, 0, 1, 0)):
        logits[0, t, pred] = 5.0
    labels = torch.tensor([[0, 2, 1, 1]])
    assert [int(x) for x in lm_loss_sum(logits, labels)[1:]] == [3, 2]
    labels[0, 3] = -100
    assert [int(x) for x in lm_loss_sum(logits, labels)[1:]] == [2, 1]
    # a tie predicts the first of its peaks, as argmax does: position 0 now predicts 1, not its label 2
    logits[0, 0] = torch.tensor([-5.0, 5.0, 5.0])
    assert [int(x) for x in lm_loss_sum(logits, labels)[1:]] == [2, 0]


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


def test_bf16_training_loss_without_accelerates_fp32_outputs_equals_the_wrapped_path(tmp_path):
    """`drop_fp32_output_wrapper` (what the loop applies after prepare) lets bf16 logits reach the loss, which upcasts
    them chunk by chunk: the same loss and parameter gradients as Accelerate's wrapped forward, whose logits come
    back as an fp32 copy (bf16 rounding of the logits gradient happens once either way)."""
    from helpers_model import tiny_run
    from helpers_train import reset_accelerate

    from ironcore.models import build_model
    from ironcore.tasks import LanguageModeling
    from ironcore.translate import build_accelerator, drop_fp32_output_wrapper

    reset_accelerate()
    run = tiny_run(precision="bfloat16")
    accelerator = build_accelerator(run)
    model = accelerator.prepare(build_model(run))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 60, (2, 16), generator=g)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids),
             "position_ids": torch.arange(16).expand(2, -1)}

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor], torch.dtype]:
        model.zero_grad(set_to_none=True)
        with accelerator.autocast():
            logits_dtype = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.dtype
            loss = LanguageModeling()(model, batch).loss_sum
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()], logits_dtype

    wrapped_loss, wrapped_grads, wrapped_dtype = loss_and_grads()
    drop_fp32_output_wrapper(accelerator, model)
    loss, grads, dtype = loss_and_grads()
    assert (wrapped_dtype, dtype) == (torch.float32, torch.bfloat16)
    assert loss.item() == pytest.approx(wrapped_loss.item(), rel=1e-6)
    for ours, theirs in zip(grads, wrapped_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    reset_accelerate()
