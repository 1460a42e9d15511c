"""`llmagentos.Agent`: an LLM agent is a kernel process.

    agent = llmagentos.Agent(model_name="gemma3-270m")
    def task(observation):
        ...
        return action
    agent.run(task)

`Agent(...)` creates a process with `proc.attach`: its own pid, token,
capabilities, context, device slot and usage, living inside this program's
OS process (`llmos ps` shows it as a child of whoever made it). With no
kernel running, the first Agent boots a private one for this program.

Agents talk through their mailboxes: `agent.send(dest, msg)`,
`agent.recv(timeout, match)`, `agent.publish(topic, msg)` and
`agent.subscribe(topic)`; a dest of ``"agent:NAME"`` reaches a named agent
now or, durably, when it next runs.

`agent.run(task)` is one episode of the loop observe → act → reward, every
step recorded in the kernel's trajectory store:

- A `Task` with an `env` (a Gymnasium id served by the kernel, or an
  instance): the agent observes the text rendering, chooses a discrete
  action (grammar-constrained LLM output, or `task.policy`), steps.
- A `Task` without an env is a question: the agent answers with the
  strategy its learner chooses, ``direct`` (the model answers, constrained
  to the task's grammar) or ``tool`` (the model writes the task tool's
  arguments, constrained to the tool's JSON schema, and the tool's result
  is the answer). With ``demos=k`` the k most similar successful
  demonstrations are shown first (imitation).
- A plain callable is the agent's program: `task(observation) -> action` is
  called as the policy, where `observation.agent` is this Agent (so the
  program can ask the model, call tools, use memory). Without an env, it is
  called once and its return value is the episode's answer; `Task(goal,
  env=..., policy=fn)` runs it every step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from .boot import private_kernel
from .client import Client, connect
from .errors import ERRORS, KernelError
from .tasks import STRATEGIES, Task


@dataclass
class Observation:
    value: Any  # the raw observation (env observation, or the goal text)
    text: str  # what the model is shown
    step: int
    goal: str
    agent: "Agent"
    reward: float = 0.0  # the reward of the previous step
    info: dict = field(default_factory=dict)


@dataclass
class EpisodeResult:
    episode: int  # trajectory id in the kernel's store
    steps: int
    total_reward: float
    success: bool
    answer: Any = None
    choice: str | None = None
    family: str | None = None
    usage: dict = field(default_factory=dict)


class Agent:
    """An LLM agent: a kernel process with its own pid, context, limits and usage.

    model_name: the model it generates with, a name or alias the kernel has
        loaded (None: the kernel's default); its children inherit it. ENOENT
        lists the known names.
    system: a system message pinned at the start of its context.
    tools / caps: the tools it may call (each adds `tool:<name>` to caps), and
        its capabilities (default: the parent's, less the privileged ones).
    nice / limits / name: as for `proc.spawn`; a name makes it a named agent
        whose context, memory and files outlive it.
    strategy: how it answers a question Task that sets none: "direct",
        "tool", or None (the default: "tool" when the task names a tool).
    learner / demos: a learner that chooses the strategy from experience, and
        how many similar successful demonstrations to show first.
    client / auto_boot: the connection to use; with no kernel running the
        first Agent boots a private one for this program.
    """

    def __init__(self, model_name: str | None = None, *, system: str | None = None,
                 tools: list[str] | None = None, caps: list[str] | None = None, nice: int = 0,
                 name: str | None = None, limits: dict | None = None,
                 strategy: str | None = None, learner: Any = None, demos: int = 0,
                 client: Client | None = None, auto_boot: bool = True):
        if strategy is not None and strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES} or None, not {strategy!r}")
        try:
            self._parent = client or connect()
        except KernelError as e:
            if e.name != "ENOTCONN" or not auto_boot:
                raise
            self._parent = private_kernel(model_name)
        self.system = system
        self.tools = list(tools or [])
        self.strategy = strategy
        self.learner = learner
        self.demos = demos
        if caps is not None and tools:
            caps = list(caps) + [f"tool:{t}" for t in tools]
        # ENOENT (the kernel's, naming the known models) for a name it has not loaded
        info = self._parent.proc.attach(name, caps, limits, nice, model_name)
        self.pid: int = info["pid"]
        self.client = Client(self._parent.address, info["token"])
        self.model_name: str = self.client.proc.stat()["model"] or \
            self.client.sys.uname()["model"]
        self.name = name or "agent"
        if system:
            self.client.ctx.append("system", system, True)

    # --- talking to the model -----------------------------------------------
    def generate(self, prompt: str, **params: Any) -> str:
        return self.client.llm.generate(prompt, None, params)["text"]

    def ask(self, question: str, **params: Any) -> str:
        """A chat turn in this agent's own context (memory kept by the kernel)."""
        params.setdefault("max_tokens", 64)
        return self.client.llm.generate(question, None, params, False, True)["text"]

    def tool(self, name: str, **args: Any) -> Any:
        return self.client.tool.call(name, args)

    # --- talking to other agents (mailboxes: kernel/mailbox.py) ----------------
    def send(self, dest: "int | str | Agent", message: Any, timeout: float = 0.0) -> dict:
        """Send a message (any MessagePack value) to a pid, an Agent, or
        ``"agent:NAME"`` (durable: kept until a process of that name takes it).
        A full mailbox raises EAGAIN after waiting up to ``timeout`` seconds."""
        if isinstance(dest, Agent):
            dest = dest.pid
        return self.client.ipc.send(dest, message, timeout)

    def recv(self, timeout: float | None = None, match: dict | None = None) -> dict | None:
        """The next message for this agent, as an envelope (``message``,
        ``from``: the sender's pid, ``sender``: ``agent:NAME`` or ``pid:N``,
        ``type``, ``topic``); None if none came within ``timeout`` seconds
        (None: wait for ever). ``match`` picks by ``from``, ``type`` or ``topic``."""
        try:
            return self.client.ipc.recv(timeout, match)
        except KernelError as e:
            if e.name == "ETIMEDOUT":
                return None
            raise

    def publish(self, topic: str, message: Any) -> int:
        """Send to every subscriber of ``topic``; returns how many got it."""
        return self.client.ipc.publish(topic, message)

    def subscribe(self, topic: str) -> list[str]:
        """Receive what is published to ``topic``; returns this agent's topics."""
        return self.client.ipc.subscribe(topic)

    def unsubscribe(self, topic: str) -> list[str]:
        return self.client.ipc.unsubscribe(topic)

    # --- the episode loop ----------------------------------------------------
    def run(self, task: Task | Callable, *, seed: int | None = None) -> EpisodeResult:
        if not isinstance(task, Task):
            if not callable(task):
                raise ERRORS["EINVAL"]("a task is a llmagentos.Task or a callable "
                                       "observation -> action")
            task = Task(goal=(task.__doc__ or task.__name__).strip(), policy=task, max_steps=1)
        if seed is not None:
            task.seed = seed
        if task.env is not None:
            return self._run_env(task)
        return self._run_question(task)

    def _choose(self, task: Task) -> str:
        if task.policy is not None:
            return "program"
        if task.strategy is not None:  # the task says how
            return task.strategy
        if self.learner is not None:
            return self.learner.select(task)
        if self.strategy is not None:
            return self.strategy if task.tool or self.strategy != "tool" else "direct"
        return "tool" if task.tool else "direct"  # a task that names a tool uses it

    def _run_question(self, task: Task) -> EpisodeResult:
        c = self.client
        choice = self._choose(task)
        before = c.proc.stat()["usage"]
        ep = c.traj.begin(task.goal, task.family, "episode",
                          {"choice": choice, "model": self.model_name, "agent": self.name})
        obs = Observation(task.goal, task.goal, 0, task.goal, self)
        info: dict = {}
        if choice == "program":
            answer = task.policy(obs)
        elif choice == "tool":
            answer, info = self._tool_answer(task)
        else:
            answer = self._direct_answer(task)
        reward = task.score(answer, self)
        c.traj.step(ep, task.goal, _jsonable({"choice": choice, "answer": answer, **info}),
                    reward, {"tokens": _spent(before, c.proc.stat()["usage"])})
        success = task.succeeded(reward, self)
        c.traj.end(ep, success, {"choice": choice})
        if self.learner is not None and choice in STRATEGIES:
            self.learner.update(task, choice, reward)
        return EpisodeResult(ep, 1, reward, success, answer, choice, task.family,
                             _spent(before, c.proc.stat()["usage"]))

    def _prompt(self, task: Task, cue: str, shots: list[tuple[str, str]],
                preface: str = "") -> str:
        parts = [self.system] if self.system else []
        if preface:
            parts.append(preface)
        parts += [f"Task: {t}\n{cue} {a}" for t, a in shots]
        parts.append(f"Task: {task.goal}\n{cue}")
        return "\n\n".join(parts)

    def _demos(self, task: Task, cue: str) -> list[tuple[str, str]]:
        if not self.demos:
            return []
        found = self.client.traj.search(task.goal, task.family, "demo", self.demos, True)
        shots = []
        for d in found:
            if d["task"] == task.goal:
                continue  # never show the answer to the very question asked
            act = d["actions"][0] if d["actions"] else None
            if isinstance(act, dict) and cue == "Answer:" and "answer" in act:
                shots.append((d["task"], str(act["answer"])))
            elif isinstance(act, dict) and cue == "Call:" and "args" in act:
                shots.append((d["task"], json.dumps(act["args"])))
        return shots[::-1]  # most similar last, nearest the question

    def _direct_answer(self, task: Task) -> str:
        prompt = self._prompt(task, "Answer:", self._demos(task, "Answer:"))
        params: dict = {"max_tokens": 16, "temperature": 0, "stop": ["\n"]}
        if task.grammar:
            params["grammar"] = task.grammar
        return self.generate(prompt, **params).strip()

    def _tool_answer(self, task: Task) -> tuple[Any, dict]:
        desc = self.client.tool.describe(task.tool)
        schema = desc["schema"]
        prompt = self._prompt(task, "Call:", self._demos(task, "Call:"),
                              f"Use the tool {task.tool}: {desc['description']} "
                              "Give its arguments as JSON.")
        text = self.generate(prompt, max_tokens=64, temperature=0,
                             json_schema=_generation_schema(schema))
        try:
            args = json.loads(text)
            result = self.client.tool.call(task.tool, args)
        except (ValueError, KernelError) as e:
            return None, {"tool": task.tool, "call": text, "error": str(e)}
        return _answer_of(result, args), {"tool": task.tool, "args": args}

    def _run_env(self, task: Task) -> EpisodeResult:
        from .envs import KernelEnv
        c = self.client
        own = isinstance(task.env, str)
        env = KernelEnv(task.env, client=c) if own else task.env
        before = c.proc.stat()["usage"]
        ep = c.traj.begin(task.goal or str(task.env), task.family or str(task.env), "episode",
                          {"choice": "program" if task.policy else "llm",
                           "model": self.model_name, "agent": self.name})
        total, steps, reward = 0.0, 0, 0.0
        try:
            value, info = env.reset(seed=task.seed)
            for t in range(task.max_steps):
                obs = Observation(value, _env_text(env, value), t, task.goal, self, reward, info)
                action = task.policy(obs) if task.policy else self._env_action(env, obs, task)
                value, reward, terminated, truncated, info = env.step(action)
                reward = float(task.reward(value, action, reward) if task.reward else reward)
                total += reward
                steps += 1
                c.traj.step(ep, _jsonable(obs.value), _jsonable(action), reward, {})
                if terminated or truncated:
                    break
        finally:
            if own:
                env.close()
        success = task.succeeded(total, self)
        c.traj.end(ep, success, None)
        return EpisodeResult(ep, steps, total, success, None, "program" if task.policy else "llm",
                             task.family, _spent(before, c.proc.stat()["usage"]))

    def _env_action(self, env: Any, obs: Observation, task: Task) -> int:
        n = getattr(env.action_space, "n", None)
        if n is None:
            raise ERRORS["EINVAL"]("the model chooses among discrete actions only; give the "
                                   "task a policy for this action space")
        start = int(getattr(env.action_space, "start", 0))
        choices = " | ".join(f'"{start + i}"' for i in range(int(n)))
        prompt = (f"{self.system + chr(10) if self.system else ''}Goal: {task.goal}\n"
                  f"Observation:\n{obs.text}\nLast reward: {obs.reward}\n"
                  f"Choose an action from {start} to {start + int(n) - 1}.\nAction:")
        text = self.generate(prompt, max_tokens=3, temperature=0.7,
                             grammar=f"root ::= \" \"? ({choices})")
        return int(text.strip())

    def close(self) -> None:
        """End the agent process (its context and files stay if it was named)."""
        try:
            self.client.close()
        finally:
            try:
                self._parent.proc.wait(self.pid, 5)
            except KernelError:
                pass  # init reaps its agents itself

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _generation_schema(schema: Any, cap: int = 48) -> Any:
    """A tool's schema as a grammar for the model: string lengths capped, since
    llama.cpp's grammar grows with maxLength and a tool call is short anyway."""
    if isinstance(schema, dict):
        out = {k: _generation_schema(v, cap) for k, v in schema.items() if k != "$schema"}
        if out.get("type") == "string":
            out["maxLength"] = min(int(out.get("maxLength", cap)), cap)
            out["minLength"] = min(int(out.get("minLength", 0)), out["maxLength"])
        return out
    if isinstance(schema, list):
        return [_generation_schema(v, cap) for v in schema]
    return schema


def _answer_of(result: Any, args: dict) -> Any:
    """A tool result as an answer: calc's value (integral floats as ints), a
    written file's text, else the result itself."""
    if isinstance(result, dict):
        if "value" in result:
            v = result["value"]
            if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
                return int(v)
            return v
        if "text" in args:
            return args["text"]
    return result


def _env_text(env: Any, value: Any) -> str:
    text = getattr(env, "last_text", None)
    return text if text else str(_jsonable(value))


def _jsonable(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def _spent(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in ("tokens_in", "tokens_out", "cached_tokens",
                                              "tool_calls")}
