"""FSDP2 learner: batch building, rank split, the AMPO update's direction, and 1 rank == 2 ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from learner_fixtures import held, make_group, make_groups, stored

from actors.records import summarise
from learner.ampo import ampo_advantages
from learner.config import AlgorithmConfig, LearnerConfig
from learner.batches import TrainSample, train_sample
from learner.group import LearnerGroup, build_train_samples, plan_batch, shard_batch, split_by_tokens
from learner.worker import LearnerWorker, Schedule, WorkerSetup, free_port, hf_name

TINY_LEARNER = dict(mixed_precision="fp32", gradient_checkpointing=False, dist_timeout_s=60.0)
# The worked example of tests/test_ampo.py and docs/protocol.md: one group of 8, two samples per mode, and its AMPO advantages.
SPEC_MODES = [1, 1, 2, 2, 3, 3, 4, 4]
SPEC_REWARDS = [0.5, 0.6, 0.7, 0.5, 0.8, 0.6, 0.9, 0.7]
SPEC_FINAL = [-2.169, -1.459, -0.297, -1.718, 1.315, -0.106, 2.927, 1.507]


# --------------------------------------------------------------------------------------------------- batch building


def test_advantages_follow_spec_and_stale_flags() -> None:
    group = make_group("a", SPEC_REWARDS, modes=SPEC_MODES, version=2, response_lens=[6, 7, 8, 9, 10, 11, 12, 13])
    samples, info = build_train_samples([group], 3, AlgorithmConfig())
    # Lengths differ from the spec example but rewards decide: the mode term uses the reward branch.
    assert [round(s.advantage, 3) for s in samples] == SPEC_FINAL
    assert all(s.stale and s.trainable for s in samples)
    assert info.metrics["adv_count/1"] == 2 and info.metrics["adv_mean/4"] == pytest.approx((2.927 + 1.507) / 2, abs=1e-3)
    # A second group with a format error gets no mode term: half of the batch's groups have one.
    with_error = make_group("b", [-2.0, *SPEC_REWARDS[1:]], modes=[None, *SPEC_MODES[1:]])
    assert build_train_samples([group, with_error], 3, AlgorithmConfig())[1].metrics["mode_term_group_ratio"] == 0.5
    grpo, _ = build_train_samples([group], 2, AlgorithmConfig(estimator="grpo"))
    assert not any(s.stale for s in grpo)
    assert sum(s.advantage for s in grpo) == pytest.approx(0.0, abs=1e-9)


def test_unscored_samples_are_masked_and_excluded_from_group_statistics() -> None:
    rewards = [0.5, None, 0.6, 0.7, 0.5, 0.8, 0.6, 0.9, 0.7]
    modes = [1, 2, 1, 2, 2, 3, 3, 4, 4]
    group = make_group("j", rewards, modes=modes)
    samples, info = build_train_samples([group], 0, AlgorithmConfig())
    failed = samples[1]
    assert not failed.trainable and failed.advantage == 0.0 and failed.loss_tokens == 0
    # The other eight are exactly the spec group: the failure neither shifts the statistics nor disables the
    # mode term (the reference would have scored it 0 and dropped the mode term of the whole group).
    kept = [s.advantage for i, s in enumerate(samples) if i != 1]
    expected = ampo_advantages(SPEC_REWARDS, [8] * 8, SPEC_MODES, ["j"] * 8)
    np.testing.assert_allclose(kept, expected, atol=1e-12)
    assert info.metrics["unscored_samples"] == 1


def test_format_errors_count_with_mode_minus_one() -> None:
    group = make_group("f", [-2.0, 0.5, 0.7], modes=[None, 1, 2])
    samples, info = build_train_samples([group], 0, AlgorithmConfig())
    assert all(s.trainable for s in samples)
    assert samples[0].advantage < 0 < samples[2].advantage
    assert info.metrics["adv_count/invalid"] == 1


def test_split_by_tokens_balances_and_covers_everything() -> None:
    sizes = [50, 10, 40, 30, 20, 20, 5]
    parts = split_by_tokens(sizes, 2)
    assert sorted(i for p in parts for i in p) == list(range(len(sizes)))
    loads = [sum(sizes[i] for i in p) for p in parts]
    assert abs(loads[0] - loads[1]) <= 5
    assert split_by_tokens([3], 2) == [[0], []]  # an empty rank still joins (with a dummy micro-batch)


def test_each_rank_gets_the_groups_of_its_samples_and_builds_the_same_train_samples() -> None:
    """The learner group plans a batch from the summaries and hands each rank the references of the groups its
    samples come from; what a rank builds from them is exactly its share of the batch built in one place."""
    groups = make_groups(3, n=4) + [make_group("j", [0.5, None, -2.0], modes=[1, 2, None], version=1)]
    expected, _ = build_train_samples(groups, 1, AlgorithmConfig())
    plans, _ = plan_batch([summarise(g) for g in groups], 1, AlgorithmConfig())
    parts = split_by_tokens([p.num_tokens for p in plans], 3)
    shards = shard_batch([held(g) for g in groups], plans, parts)
    for part, shard in zip(parts, shards):
        assert list(shard.refs) == [groups[g] for g in sorted({plans[i].group for i in part})]  # the groups it needs
        built = [train_sample(shard.refs[p.group].samples, p) for p in shard.plans]  # `held`: the ref is the group
        assert built == [expected[i] for i in part]
    assert sum(s.loss_tokens for s in expected) == sum(
        groups[p.group].samples[p.sample].response_length for p in plans if p.trainable)


def test_collate_aligns_response_tokens_and_pads_dummy_rows() -> None:
    setup = WorkerSetup("unused", LearnerConfig(**TINY_LEARNER), Schedule(lr=1e-3), AlgorithmConfig())
    worker = LearnerWorker(0, 1, setup)
    sample = TrainSample((7, 8, 9), (10, 11), (-0.5, -1.5), 1.0, stale=True)
    mb = worker._collate_rl([sample, TrainSample((7,), (12,), (-2.0,), -1.0, trainable=False)])
    # Position t predicts token t+1: responses at positions 3,4 are scored at positions 2,3.
    assert mb["mask"][0].tolist() == [False, False, True, True, False]
    assert mb["targets"][0, 2:4].tolist() == [10, 11]
    assert mb["behaviour"][0, 2:4].tolist() == [-0.5, -1.5]
    assert not mb["mask"][1].any()  # an unscored sample keeps its row but trains nothing
    dummy = worker._collate_rl([])
    assert dummy["input_ids"].shape == (1, 1) and not dummy["mask"].any()


@pytest.mark.integration
def test_only_the_response_span_goes_through_the_lm_head_with_the_same_numbers(tiny_model_dir) -> None:
    """The learner's log-probs (logits kept only where a response token is scored) equal those of the full logits,
    for a trainable and an unscored sample of different prompt lengths alike; outside the span they are 0."""
    from learner.loss import token_logprobs_and_entropy

    setup = WorkerSetup(str(tiny_model_dir), LearnerConfig(**TINY_LEARNER), Schedule(lr=1e-3), AlgorithmConfig())
    worker = LearnerWorker(0, 1, setup)
    worker.setup("127.0.0.1", free_port())
    try:
        model, _ = worker._require_model()
        rows = [TrainSample(tuple(range(5, 25)), (30, 31, 32), (-1.0,) * 3, 1.0),
                TrainSample(tuple(range(5, 12)), (40, 41, 42, 43, 44), (-1.0,) * 5, -1.0, trainable=False)]
        mb = worker._collate_rl(rows)
        with torch.no_grad():
            trimmed, entropy = worker._token_logprobs(model, mb)
            logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False).logits
            full, full_entropy = token_logprobs_and_entropy(logits, mb["targets"], 1.0)
            served = worker.logprobs(rows, 1)
    finally:
        worker.shutdown()
    span = mb["response"]
    assert span[1].sum() == 5 and not mb["mask"][1].any()  # the unscored row still has its response positions
    torch.testing.assert_close(trimmed[span], full[span], rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy[span], full_entropy[span], rtol=0, atol=1e-5)
    assert trimmed[:, :6].abs().sum() == 0  # before the first scored position (row 1 scores from 6 on)
    assert served[1] == pytest.approx(full[1, 6:11].tolist(), abs=1e-5) and len(served[0]) == 3


def test_hf_names_strip_wrapper_prefixes() -> None:
    assert hf_name("model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert hf_name("_orig_mod.model.norm.weight") == "model.norm.weight"


# --------------------------------------------------------------------------------------------------- the update


@pytest.mark.integration
def test_ampo_step_moves_logprobs_with_the_advantage_sign(tiny_model_dir) -> None:
    """One in-process rank: after one AMPO step every positive-advantage response is more likely and every
    negative one less likely (KL and entropy terms off, so only the policy gradient acts)."""
    algorithm = AlgorithmConfig(kl_coef=0.0, entropy_coef=0.0)
    setup = WorkerSetup(str(tiny_model_dir), LearnerConfig(**TINY_LEARNER, micro_batch_size=4), Schedule(lr=1e-4), algorithm)
    worker = LearnerWorker(0, 1, setup)
    worker.setup("127.0.0.1", free_port())
    try:
        spec_group = make_group("a", SPEC_REWARDS, modes=SPEC_MODES, response_lens=[6, 7, 8, 9, 10, 11, 12, 13])
        grpo_group = make_group("b", [0.1, 0.9, 0.3, 0.2], response_lens=[5, 9, 7, 8], seed=1)
        samples, _ = build_train_samples([spec_group, grpo_group], 0, algorithm)
        before = [np.mean(x) for x in worker.logprobs(samples, 3)]
        metrics = worker.step(samples, 3, sum(s.loss_tokens for s in samples))
        after = [np.mean(x) for x in worker.logprobs(samples, 3)]
    finally:
        worker.shutdown()
    assert metrics["grad_norm"] > 0 and metrics["lr"] == pytest.approx(1e-4)
    for s, b, a in zip(samples, before, after):
        assert (a - b) * s.advantage > 0, f"advantage {s.advantage:+.3f} but mean log-prob moved by {a - b:+.5f}"


@pytest.mark.integration
def test_bf16_and_gradient_checkpointing_step_and_stream_fp32_weights(tiny_model_dir) -> None:
    """The memory settings of real runs: bf16 compute (fp32 master weights) with activation checkpointing."""
    learner = LearnerConfig(mixed_precision="bf16", gradient_checkpointing=True, dist_timeout_s=60.0, micro_batch_size=2)
    worker = LearnerWorker(0, 1, WorkerSetup(str(tiny_model_dir), learner, Schedule(lr=1e-3), AlgorithmConfig()))
    worker.setup("127.0.0.1", free_port())
    try:
        samples, _ = build_train_samples(make_groups(2), 0, AlgorithmConfig())
        metrics = worker.step(samples, 4, sum(s.loss_tokens for s in samples))
        weights = dict(worker.full_weights())
    finally:
        worker.shutdown()
    assert np.isfinite(metrics["loss_tok_sum"]) and metrics["grad_norm"] > 0
    assert all(t.dtype == torch.float32 for t in weights.values())
    # HF checkpoint names; the tied lm_head alias is not sent (vLLM re-ties it to the embedding).
    assert "model.embed_tokens.weight" in weights and "lm_head.weight" not in weights


@pytest.mark.slow
def test_two_gloo_ranks_match_one_rank(ray_local, tiny_model_dir) -> None:
    """Same batch, same initial weights: 1 rank and 2 gloo ranks give the same loss and gradient norm (relative
    tolerance 1e-5; observed ~1e-7, the difference being float summation order) and the same updated policy."""
    algorithm = AlgorithmConfig(max_staleness=1, kl_coef=0.01)
    groups = make_groups(3, version=0)  # stale at version 1: the TIS weights are exercised too
    probe, _ = build_train_samples(make_groups(2, prefix="probe"), 1, algorithm)
    results = {}
    for ranks in (1, 2):
        learner = LearnerConfig(**TINY_LEARNER, num_ranks=ranks, micro_batch_size=2, lr=1e-3)
        group = LearnerGroup(learner, tiny_model_dir, algorithm=algorithm)
        try:
            metrics = group.step(stored(groups), version=1)
            results[ranks] = (metrics, group.logprobs(probe))
        finally:
            group.shutdown()
    (one, lp_one), (two, lp_two) = results[1], results[2]
    print(f"1 rank: loss {one['loss']!r} grad norm {one['grad_norm']!r}; 2 ranks: loss {two['loss']!r} grad norm {two['grad_norm']!r}")
    for key in ("loss", "pg_loss", "kl", "entropy", "grad_norm", "is_weight_mean", "is_weight_max"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-9), key
    assert one["loss_tokens"] == two["loss_tokens"] and one["grad_norm"] > 0
    # Every sample is one version old, so no token had the learner's weights on both sides: nothing was compared.
    assert one["logprob_mismatch"] is None and one["logprob_mismatch_tokens"] == 0
    np.testing.assert_allclose(np.concatenate(lp_two), np.concatenate(lp_one), rtol=0, atol=1e-5)
