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


# --- the expert that generates the data -------------------------------------------------------------

# The rule's name is part of every dataset's cache key: data made by another rule is never reused.
SCRIPTED_POLICY = "metaworld-scripted-v3"  # the policies as metaworld ships them (the data before the rule)
EXPERT_POLICY = "metaworld-scripted-v3+open+hold-v1"
EXPERTS = ("hold", "scripted")  # the track setting ``expert``
HOLD_MODES = ("stop", "freeze")  # tried in this order; a tie keeps the first


class Expert:
    """Meta-World's scripted policy for ``task`` with two general corrections (``hold`` given), the same
    for every task; ``hold=None`` is the scripted policy unchanged.

    1. *Open means open.* A grab effort of exactly 0 (what a third of the policies send while not
       grasping) becomes -1, as the other policies send: at 0 the fingers stay half closed and can come
       to rest on top of an object instead of around it (push-back stalls so above its puck).
    2. *Hold success.* The scripted policies never stop: they keep pushing, pressing or lifting after
       ``info["success"]`` and on many tasks undo it (a door pushed past, a puck lifted off its goal),
       while the leaderboard scores success at the last step. From the first step whose
       ``info["success"]`` is true the expert repeats its last gripper command and pins the arm's
       position target (Meta-World's mocap, which an action moves by ``action_scale`` times its xyz
       part): ``stop`` pins it where it was at that step (the arm keeps the pressure it had), ``freeze``
       where the hand was (the pressure is released, for tasks where it would push the object on past
       its goal). Each hold step's xyz action is the one that takes the target back to the pin, so
       action noise jitters the arm around the pin instead of random-walking it away. Which of the two a
       task uses is measured, not listed (:func:`agents.data.expert_hold_mode`).
    """

    def __init__(self, task: str, env: gym.Env, hold: str | None = "stop"):
        if hold is not None and hold not in HOLD_MODES:
            raise ConfigError(choices_message("expert hold mode", hold, list(HOLD_MODES)))
        self.task, self.hold = task, hold
        self.env = env.unwrapped
        self.policy = scripted_policy(task)
        self.reset()

    def reset(self) -> None:
        """Start of an episode: back to the scripted phase."""
        self.pin: np.ndarray | None = None
        self.last_grip = 0.0

    @property
    def holding(self) -> bool:
        return self.pin is not None

    def _target(self) -> np.ndarray:
        return np.asarray(self.env.data.mocap_pos[0], np.float64)

    def act(self, obs: np.ndarray) -> np.ndarray:
        """The noise-free action (float64, not yet clipped) for ``obs``."""
        if self.pin is not None:
            delta = np.clip((self.pin - self._target()) / self.env.action_scale, -1.0, 1.0)
            return np.append(delta, self.last_grip)
        action = np.array(self.policy.get_action(obs), np.float64)
        if self.hold is not None and action[3] == 0.0:
            action[3] = -1.0
        self.last_grip = float(action[3])
        return action

    def observe(self, obs: np.ndarray, success: bool) -> None:
        """After a step: ``obs`` is the new observation, ``success`` that step's ``info["success"]``."""
        if self.hold is not None and success and self.pin is None:
            self.pin = (self._target() if self.hold == "stop" else np.asarray(obs[:3], np.float64)).copy()
