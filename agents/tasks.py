"""Meta-World task sets (MT50, CW10, MT40) and a seeded v3 environment factory matching the papers' setup.

Setup (specs/rl-protocol.md): 200-step episodes, float32 observations, goal observable, the v2-style
reward, no termination on success, and object/goal positions resampled at every reset (the papers'
``random_init_all``) instead of v3's 50 pre-generated variants.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from harness.errors import ConfigError, choices_message

EPISODE_LENGTH = 200
OBS_DIM = 39
ACT_DIM = 4


def _metaworld_names() -> list[str]:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    return sorted(n[: -len("-v3")] for n in ALL_V3_ENVIRONMENTS)


MT50: list[str] = _metaworld_names()

CW10: list[str] = [
    "hammer", "push-wall", "faucet-close", "push-back", "stick-pull",
    "handle-press-side", "push", "shelf-place", "window-close", "peg-unplug-side",
]

MT40: list[str] = [t for t in MT50 if t not in CW10]

# Fail at import rather than run a benchmark on a silently different task list.
assert len(MT50) == 50 and set(CW10) <= set(MT50) and len(MT40) == 40, "metaworld's MT50 is not the expected one"


def check_task(task: str, valid: list[str] | None = None) -> str:
    """Return ``task`` if it is a Meta-World task (of ``valid`` when given), else raise ConfigError."""
    valid = MT50 if valid is None else valid
    if task not in valid:
        raise ConfigError(choices_message("Meta-World task", task, valid))
    return task


class Float32Obs(gym.ObservationWrapper):
    """Cast observations to float32 (the DT's dtype; v3 returns float64)."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        space = env.observation_space
        self.observation_space = gym.spaces.Box(space.low.astype(np.float32), space.high.astype(np.float32),
                                                dtype=np.float32)

    def observation(self, observation: Any) -> np.ndarray:
        return np.asarray(observation, dtype=np.float32)


def make_env(task: str, seed: int = 0, max_episode_steps: int = EPISODE_LENGTH) -> gym.Env:
    """A goal-observable Meta-World v3 env for ``task``, resampling object and goal at every reset.

    Seeded: the sequence of initial positions is a function of ``seed`` alone.
    """
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    check_task(task)
    env = ALL_V3_ENVIRONMENTS[f"{task}-v3"](render_mode=None)
    # The same steps metaworld's own goal-observable constructor takes, without pinning one variant.
    env._partially_observable = False
    del env.sawyer_observation_space  # cached property: recomputed with the goal visible
    env._set_task_called = True
    # Resample at every reset from the env's own seeded generator (v3 freezes one rand_vec per task).
    env._freeze_rand_vec = False
    env.seeded_rand_vec = True
    env.max_path_length = max_episode_steps
    env.seed(seed)
    return Float32Obs(gym.wrappers.TimeLimit(env, max_episode_steps))


def scripted_policy(task: str):
    """Meta-World's scripted expert policy for ``task`` (object with ``get_action(obs)``)."""
    from metaworld.policies import ENV_POLICY_MAP

    check_task(task)
    return ENV_POLICY_MAP[f"{task}-v3"]()
