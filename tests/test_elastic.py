"""Elastic resume (issue 20): a checkpoint saved at one world size resumes with
plan="auto" at another — the planner re-plans for the new world and ``pm.load`` reshards
(fixing the layout from the batch the planner saw: no extra user step). 8 -> 4 -> 6 ranks,
the losses continuing the single-device run of the same steps."""
import torch

import ptdp_compiler as ptdp
from tests.models import assert_close_tensor, batch, build

GLOBAL_BATCH = 24     # divisible by every data-parallel degree of 8, 4 and 6 ranks
LR = 0.1


def _data(step):
    return batch("gpt", GLOBAL_BATCH, seed=100 + step)


def _elastic_job(path, steps, resume):
    model = build("gpt", n_layer=4)
    args, kwargs = _data(0)
    pm = ptdp.parallelize(model, plan="auto", example_inputs=args, example_kwargs=kwargs,
                          codegen="aot_eager")
    pm.optimizer(torch.optim.SGD, lr=LR)
    first = pm.load(path)["next_step"] if resume else 0
    losses = []
    for s in range(first, first + steps):
        a, kw = _data(s)
        losses.append(float(pm.train_step(*(pm.dp_shard(x) for x in a),
                                           **{k: pm.dp_shard(v) for k, v in kw.items()})))
        pm.step()
    pm.save(path, extra={"next_step": first + steps})
    return losses, pm.auto_plan.parallel_config_kwargs(), pm.full_state_dict()


def test_resume_at_8_then_4_then_6_ranks_replans_and_continues_the_losses(world, tmp_path):
    model = build("gpt", n_layer=4)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ref = []
    for s in range(6):
        args, kwargs = _data(s)
        opt.zero_grad()
        loss = model(*args, **kwargs)
        loss.backward()
        opt.step()
        ref.append(loss.item())
    path = str(tmp_path / "elastic")
    got, plans = [], []
    for n, resume in ((8, False), (4, True), (6, True)):
        res = world(n, _elastic_job, path, 2, resume, timeout=400)
        losses, plan, params = res[0]
        assert all(r[1] == plan for r in res), "ranks planned differently"
        got += losses
        plans.append(plan)
    w = [p["tp"] * p["pp"] * p["dp"] * p["dp_shard"] * p["cp"] for p in plans]
    assert w == [8, 4, 6], plans
    for s, (a, b) in enumerate(zip(got, ref)):
        assert abs(a - b) <= 1e-5 * abs(b), (s, got, ref)
    for k, p in model.named_parameters():
        assert_close_tensor(k, params[k], p.detach(), rtol=1e-5)
