"""AdaLoRA against LoRA over 300 updates on the tests' tiny DT (CPU): the loss each reaches at the same lr, with
and without the orthogonality penalty, and AdaLoRA at 10x the lr. Run: python benchmarks/scripts/adalora_slow_start.py"""
import sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "tests"))
from test_methods_all import dt_setup
from harness.methods import get_method, MethodContext
steps = 300
for name, st, lr in [("lora", {"r": 2}, 1e-3), ("adalora", {"r": 2}, 1e-3), ("adalora", {"r": 2, "orth_reg_weight": 0.0}, 1e-3), ("adalora", {"r": 2}, 1e-2)]:
    model, site, batch, loss_fn, fwd = dt_setup()
    m = get_method(name)
    settings = m.resolve(st) if hasattr(m, "resolve") else {**{k: v.default for k, v in m.settings.items()}, **st}
    ctx = MethodContext(total_steps=steps)
    w = m.wrap(model, site, settings, ctx)
    opt = torch.optim.AdamW([p for p in w.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    first = None
    for i in range(steps):
        l = loss_fn(w, batch)
        extra = m.extra_loss(w)
        tot = l + (extra if extra is not None else 0)
        tot.backward(); opt.step(); m.on_step(w, i, ctx); opt.zero_grad(set_to_none=True)
        if first is None: first = float(l)
    print(name, st, lr, "loss", round(first, 4), "->", round(float(l), 4))
