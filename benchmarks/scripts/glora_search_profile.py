"""Where a GLoRA trial's time goes (the subnet search in ``finalize``, the rollouts in ``eval``), on the CPU
with a small DT (4 layers, width 128) and a short search (population 10, 2 generations): run from the
repository root with HARNESS_CACHE set to a scratch folder; the record's extra.timing has finalize_s and
eval_s, and the profile's top functions follow."""
import cProfile, pstats, sys, time
from harness.cli import main
args = ["run", "--track", "rl", "--benchmark", "cw10", "--task", "hammer", "--method", "glora", "--steps", "20",
        "--set", "settings.n_layer=4", "--set", "settings.n_head=8", "--set", "settings.n_embd=128", "--set", "settings.context=20",
        "--set", "settings.data_episodes=2", "--set", "settings.noise_levels=[0.0]", "--set", "settings.pretrain_tasks=[reach]",
        "--set", "settings.pretrain_steps=10", "--set", "settings.pretrain_batch_size=16", "--set", "settings.pretrain_eval_episodes=0",
        "--set", "settings.eval_workers=1", "--set", "settings.data_workers=1", "--set", "settings.device=cpu",
        "--set", "settings.eval_pretrained=false", "--set", "budget.eval_episodes=1", "--set", "budget.batch_size=128",
        "--set", "budget.stage=select", "--set", "search_population=10", "--set", "search_generations=2",
        "--set", "search_mutations=5", "--set", "search_crossovers=5"]
if __name__ == "__main__":
    cProfile.run("main(args)", "/tmp/glora.prof")
    p = pstats.Stats("/tmp/glora.prof"); p.sort_stats("cumulative").print_stats(45)
