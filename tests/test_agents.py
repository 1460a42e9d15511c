"""The seed's model on the real device: Agents are kernel processes that run
Tasks, collect Rewards into trajectories, and learn."""

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import PY

import llmagentos
from llmagentos import Task, learn, tasks


@pytest.fixture
def agent(llm_kernel):
    a = llmagentos.Agent(model_name="gemma3-270m", name="tester",
                         client=llm_kernel.client())
    yield a
    a.close()


def test_an_agent_is_a_kernel_process(llm_kernel):
    with llm_kernel.client() as c:
        a = llmagentos.Agent(model_name="gemma3-270m", name="proc-agent", client=c)
        row = next(r for r in c.proc.ps() if r["pid"] == a.pid)
        assert row["name"] == "proc-agent" and row["ppid"] == 1 and row["attached"]
        assert a.client.proc.getpid() == a.pid
        a.generate("Hello", max_tokens=3)
        assert c.proc.stat(a.pid)["usage"]["tokens_out"] == 3  # accounted to the agent
        c.proc.kill(a.pid, "SIGSTOP")
        assert c.proc.stat(a.pid)["state"] == "STOPPED"
        c.proc.kill(a.pid, "SIGCONT")
        c.proc.kill(a.pid, "SIGKILL")
        with pytest.raises(ProcessLookupError):
            a.client.proc.getpid()  # the process is gone; its connection says so
        a.close()
        assert all(r["pid"] != a.pid for r in c.proc.ps())


def test_the_seed_example_runs_as_written(llm_kernel):
    prog = textwrap.dedent("""
        import llmagentos

        agent = llmagentos.Agent(model_name="gemma3-270m")

        def task(observation):
            # the agent's program: observe, think with the model, return an action
            reply = observation.agent.generate("The opposite of cold is", max_tokens=4,
                                               temperature=0)
            action = reply.strip().split()[0].strip(".")
            return action

        result = agent.run(task)
        print(result.answer, result.steps, result.episode)
    """)
    env = {**llm_kernel.env(), "PYTHONPATH": os.getcwd()}
    r = subprocess.run([PY, "-c", prog], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    answer, steps, episode = r.stdout.split()
    assert answer.isalpha() and steps == "1"
    with llm_kernel.client() as c:
        ep = c.traj.get(int(episode))
    assert ep["trajectory"][0]["action"]["answer"] == answer
    assert ep["meta"]["choice"] == "program"


def test_agent_boots_a_private_kernel_when_none_runs(tmp_path):
    prog = textwrap.dedent("""
        import llmagentos
        agent = llmagentos.Agent(model_name="gemma3-270m")
        r = agent.run(llmagentos.Task("What is 1 + 1?", answer="2", tool="calc.eval"))
        print("ran", r.steps, agent.pid)
    """)
    env = dict(os.environ, LLMAGENTOS_RUN_DIR=str(tmp_path / "none"),
               LLMAGENTOS_STATE_DIR=str(tmp_path / "state"))
    for k in ("LLMAGENTOS_SOCKET", "LLMAGENTOS_TOKEN"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-c", prog], env=env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ran 1 ")


def test_unknown_model_names_the_known_ones(llm_kernel):
    with pytest.raises(FileNotFoundError, match="known models: gemma3-270m"):
        llmagentos.Agent(model_name="gpt-3", client=llm_kernel.client())


def test_rewards_and_trajectories_are_recorded(agent):
    task = Task("What is 6 * 7?", answer="42", family="arith-test", tool="calc.eval",
                grammar=tasks.INT_GRAMMAR)
    agent.strategy = "tool"
    r = agent.run(task)
    ep = agent.client.traj.get(r.episode)
    assert ep["family"] == "arith-test" and ep["owner"] == "agent:tester"
    step = ep["trajectory"][0]
    assert step["action"]["choice"] == "tool" and step["action"]["tool"] == "calc.eval"
    assert step["reward"] == r.total_reward and ep["success"] == r.success
    assert step["info"]["tokens"]["tokens_out"] > 0 and step["info"]["tokens"]["tool_calls"] == 1


def test_imitation_demonstrations_are_used(agent, llm_kernel):
    with llm_kernel.client() as c:
        for t in tasks.arithmetic(8, seed=500):
            learn.record_demo(c, t, answer=t.answer, args={"expression": t.goal[8:-1]})
    agent.strategy, agent.demos = "tool", 3
    held = tasks.arithmetic(4, seed=7)
    results = [agent.run(t) for t in held]
    # exemplars in the prompt: the model writes the expression and the calculator answers
    assert sum(r.success for r in results) >= 3
    assert all(isinstance(r.answer, int) for r in results if r.success)


def test_file_task_graded_by_a_checker(agent, llm_kernel):
    t = tasks.files(1, seed=3)[0]
    with llm_kernel.client() as c:
        for demo in tasks.files(4, seed=11):
            learn.record_demo(c, demo, args={"path": "/answer.txt", "text": demo.answer})
    agent.strategy, agent.demos = "tool", 3
    r = agent.run(t)
    written = agent.client.fs.read_file("/answer.txt").decode()
    assert r.success == (written.strip().lower() == t.answer)


def test_strategy_learning_and_meta_warm_start(llm_kernel):
    """Q-learning over the agent's discrete choice (answer directly or use the
    calculator): the tool wins on arithmetic; a new agent warm-started from
    the family's statistics picks it from its first episode."""
    with llm_kernel.client() as c:
        for t in tasks.arithmetic(8, seed=900):
            learn.record_demo(c, t, answer=t.answer, args={"expression": t.goal[8:-1]})
        learner = learn.StrategyLearner("q", seed=1, epsilon=0.5)
        a = llmagentos.Agent(model_name="gemma3-270m", name="learner", learner=learner,
                             demos=2, client=c)
        for t in tasks.arithmetic(8, seed=901):
            a.run(t)
        a.close()
        pref = learner.preference(tasks.arithmetic(1)[0])
        assert pref["tool"] > pref["direct"]
        stats = c.traj.stats("arithmetic")
        assert stats["choices"]["tool"]["success_rate"] > \
            stats["choices"].get("direct", {"success_rate": 0})["success_rate"]
        fresh = learn.StrategyLearner("q", seed=2)
        learn.warm_start(fresh, c, tasks.arithmetic(1)[0])
        assert fresh.select(tasks.arithmetic(1)[0]) == "tool"


def test_llm_agent_plays_a_gymnasium_environment(agent):
    task = Task("Reach the goal G without falling into a hole H.", env="FrozenLake-v1",
                max_steps=6, family="frozenlake", seed=3)
    r = agent.run(task)
    ep = agent.client.traj.get(r.episode)
    assert 1 <= r.steps <= 6 and ep["steps"] == r.steps
    assert all(s["action"] in (0, 1, 2, 3) for s in ep["trajectory"])
    assert r.usage["tokens_out"] >= r.steps  # each action came from the model
    assert agent.client.call("env.list", "FrozenLake")  # the env group is there


def test_policy_program_on_an_environment(agent):
    def balance(observation):
        """Push the cart toward the side the pole leans to."""
        x, v, angle, omega = observation.value
        return 1 if angle + 0.5 * omega > 0 else 0

    r = agent.run(Task("Balance the pole.", env="CartPole-v1", policy=balance,
                       max_steps=200, family="cartpole", seed=0))
    assert r.steps == 200 and r.total_reward == 200.0 and r.success
    assert r.usage["tokens_out"] == 0  # a program, not the model


def test_stopping_a_program_parks_the_agents_it_hosts(llm_kernel):
    prog = textwrap.dedent("""
        import llmagentos, sys
        a = llmagentos.Agent(model_name="gemma3-270m", name="hosted")
        print(a.pid, flush=True)
        a.generate("A long story:", max_tokens=200, temperature=0)
        print("done", flush=True)
    """)
    with llm_kernel.client() as c:
        host = c.proc.spawn([PY, "-c", prog], "host")
        from conftest import wait_for
        agent_pid = int(wait_for(lambda: c.proc.logs(host)["data"].split()
                                 and c.proc.logs(host)["data"].split()[0]))
        # its 200 tokens are under way (on a fast machine the first ones may be out already)
        wait_for(lambda: c.sys.stats()["device"]["running"] >= 1, timeout=60)
        c.proc.kill(host, "SIGSTOP")
        assert c.proc.stat(agent_pid)["state"] == "STOPPED"
        wait_for(lambda: c.sys.stats()["device"]["running"] == 0, timeout=10)
        c.proc.kill(host, "SIGCONT")
        assert c.proc.wait(host, 120)["exit_code"] == 0
        assert c.proc.logs(host)["data"].split()[-1] == b"done"


def test_a_task_that_names_a_tool_uses_it(llm_kernel):
    """Agent() with no strategy: a Task naming a tool is answered with the tool."""
    a = llmagentos.Agent(model_name="gemma3-270m", client=llm_kernel.client())
    try:
        r = a.run(Task("What is 17 + 25?", answer="42", tool="calc.eval"))
        assert r.choice == "tool"
        step = a.client.traj.get(r.episode)["trajectory"][0]
        assert step["action"]["tool"] == "calc.eval"
        r = a.run(Task("What is 17 + 25?", answer="42", tool="calc.eval", strategy="direct"))
        assert r.choice == "direct"  # unless told otherwise
        r = a.run(Task("What is 2 + 2?", answer="4", tool="calc.eval", policy="tool"))
        assert r.choice == "tool"  # policy="tool" used to raise TypeError
    finally:
        a.close()


def test_bad_strategies_are_clear_errors():
    with pytest.raises(ValueError, match="strategy"):
        Task("x", policy="guess")
    with pytest.raises(ValueError, match="needs the tool"):
        Task("x", strategy="tool")
    with pytest.raises(ValueError, match="strategy"):
        llmagentos.Agent(strategy="magic", auto_boot=False)


def test_unknown_model_without_a_kernel_is_the_same_enoent(tmp_path):
    """With no kernel running, Agent() boots a private one; an unknown model is
    the ENOENT a running kernel gives, and a failed private boot leaves nothing."""
    import glob
    tmp = tmp_path / "tmp"  # its own TMPDIR: other tests' private kernels come and go
    tmp.mkdir()
    pattern = str(tmp / "llmagentos-private-*")
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf")
    prog = textwrap.dedent(f"""
        import llmagentos
        for model in ["gpt-3", {str(bad)!r}]:
            try:
                llmagentos.Agent(model_name=model)
            except llmagentos.KernelError as e:
                print(model.rsplit("/", 1)[-1], e.name, isinstance(e, FileNotFoundError))
    """)
    before = set(glob.glob(pattern))
    env = {**os.environ, "LLMAGENTOS_RUN_DIR": str(tmp_path / "no-kernel"),
           "LLMAGENTOS_STATE_DIR": str(tmp_path / "state"), "TMPDIR": str(tmp)}
    for k in ("LLMAGENTOS_SOCKET", "LLMAGENTOS_TOKEN"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-c", prog], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "gpt-3 ENOENT True"
    assert lines[1].startswith("broken.gguf ")
    assert set(glob.glob(pattern)) == before
