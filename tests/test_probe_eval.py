"""benchmark/probe_eval.py: the evaluation policies it compares are the ones it names (issue 28's Asterix question)."""
import importlib.util
import json

import numpy as np
import torch
from harness import ROOT, load_script, parse

spec = importlib.util.spec_from_file_location("probe_eval", ROOT / "benchmark" / "probe_eval.py")
probe_eval = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe_eval)


def saved_model(tmp_path, m):
    args = parse(m, ["--encoder", "der", "--env-id", "ALE/Breakout-v5", "--max-episode-steps", "40", "--seed", "3"])[0]
    torch.manual_seed(0)
    net = m.make_network(4, **m.network_flags(args))
    path = tmp_path / "der_single_expert.cleanrl_model"
    torch.save({"model": net.state_dict(), "args": vars(args)}, path)
    return path, net, args


def test_protocol_is_the_runs_own_evaluation(tmp_path):
    m = load_script("der_single_expert")
    path, net, args = saved_model(tmp_path, m)
    _, results = probe_eval.probe(m, path, ["protocol", "eps0.1"], episodes=3)
    expected = m.evaluate(net, args, 3, "cpu", args.seed + 1000)
    assert results["protocol"]["returns"] == [expected[i] for i in range(3)]
    assert results["protocol"]["epsilon"] == args.eval_epsilon and results["eps0.1"]["epsilon"] == 0.1
    assert 32 <= results["protocol"]["mean_length"] <= 40  # the 160-frame cap, up to 30 of them no-ops
    assert abs(sum(results["protocol"]["greedy_action_share"]) - 1) < 1e-3


def test_a_checkpoint_is_probed_through_its_online_network(tmp_path):
    # benchmark.sh keeps a finished run's state.pt as final_state.pt: its q_network, not its target network
    m = load_script("der_single_expert")
    path, net, args = saved_model(tmp_path, m)
    target = m.make_network(4, **m.network_flags(args))  # other weights: probing it would give other returns
    state = tmp_path / "final_state.pt"
    torch.save({"q_network": net.state_dict(), "target_network": target.state_dict(), "args": vars(args)}, state)
    from_model = probe_eval.probe(m, path, ["protocol"], episodes=2)[1]["protocol"]["returns"]
    from_checkpoint = probe_eval.probe(m, state, ["protocol"], episodes=2)[1]["protocol"]
    assert from_checkpoint["returns"] == from_model
    torch.save({"q_network": target.state_dict(), "args": vars(args)}, state)
    assert probe_eval.probe(m, state, ["protocol"], episodes=2)[1]["protocol"]["greedy_action_share"] != \
        from_checkpoint["greedy_action_share"]


def test_noisy_policies_draw_noise_and_the_protocol_does_not(tmp_path):
    m = load_script("der_single_expert")
    _, net, _ = saved_model(tmp_path, m)
    state = torch.randint(0, 256, (1, 4, 84, 84), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    net.eval()
    with torch.no_grad():
        mean_q = net(state)[1]
        for noise, fresh_each_call in [(None, False), ("step", True), ("episode", False)]:
            policy = probe_eval.CountingPolicy(m, net, noise, seed=0).eval()
            if noise == "episode":
                policy.new_episode()
            first, second = policy(state)[1], policy(state)[1]
            assert torch.equal(first, second) != fresh_each_call, noise
            assert torch.equal(first, mean_q) == (noise is None), noise
            assert policy.counts.sum() == 2
