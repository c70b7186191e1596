"""Run a config as a Flower simulation on Ray (a local Ray, or a running cluster).

The simulation runs in a child process that this one watches. Ray ends its driver process itself
when the node's raylet or object store dies (no Python exception reaches fedcl), so only a parent
can tell the user that the runtime was lost and how to continue: ``RuntimeLost``, whose message
points to ``fedcl resume=<run dir>`` (the checkpoint after the last completed round is intact).
Once Ray runs and before Flower starts, the Ray resources a client asks for are checked against
what Ray has (``ray.nodes()``): otherwise Flower's actor pool is empty and the server waits for
replies forever.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import traceback

from omegaconf import DictConfig

from fedcl.errors import ConfigError, RuntimeLost
from fedcl.faults import INJECTED_CRASH
from fedcl.runtime.backend import backend_config, num_slots, ray_init_args

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

POLL_S = 1.0        # how often the parent looks whether the simulation process is still alive
EXIT_GRACE_S = 30.0  # after its answer, the child's time to exit before it is killed


# ---- resources ------------------------------------------------------------------------------------
def node_resources(cfg: DictConfig) -> tuple[list[dict], str]:
    """CPU and GPU counts of each Ray node the clients could run on, and where they come from: the
    Ray this process started (``start_local_ray``), or a short visit to the cluster at ``ray.address``."""
    import ray

    if not cfg.ray.address:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive") and n.get("Resources")]
        cpus = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
        return nodes, (f"the local Ray (ray.num_cpus={cfg.ray.num_cpus})" if cfg.ray.num_cpus
                       else f"the local Ray (all {cpus:g} CPUs it found on this machine)")
    try:  # a short visit: Flower connects again with its own settings
        ray.init(address=str(cfg.ray.address), logging_level=logging.ERROR, include_dashboard=False)
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive") and n.get("Resources")]
    except (ConnectionError, RuntimeError) as err:
        raise ConfigError(f"ray.address={cfg.ray.address}: no Ray cluster could be reached ({err}). Start one "
                          "(`ray start --head`), give its address, or leave ray.address unset to start a "
                          "Ray of fedcl's own.") from None
    finally:
        ray.shutdown()
    return nodes, f"the Ray cluster at ray.address={cfg.ray.address} ({len(nodes)} nodes)"


def check_num_cpus(cfg: DictConfig) -> None:
    if cfg.ray.num_cpus is not None and not cfg.ray.address and float(cfg.ray.num_cpus) < 1:
        raise ConfigError(f"ray.num_cpus={cfg.ray.num_cpus} must be >= 1 (or null: all CPUs of this machine).")


def check_resources(cfg: DictConfig, nodes: list[dict], source: str) -> None:
    """ConfigError unless at least one client fits on one of the Ray ``nodes`` (their resources,
    as ``ray.nodes()`` gives them), counted as Flower sizes its pool."""
    need_cpu, need_gpu = float(cfg.ray.client_cpus), float(cfg.ray.client_gpus)
    cpus = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    gpus = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    fits = [n for n in nodes if n.get("CPU", 0.0) >= need_cpu and (need_gpu == 0 or n.get("GPU", 0.0) >= need_gpu)]
    if fits:
        return
    if need_gpu > gpus:
        where = " on its largest node" if cfg.ray.address else ""
        raise ConfigError(f"ray.client_gpus={cfg.ray.client_gpus} asks for a GPU share per client, but {source} has "
                          f"{gpus:g} GPUs{where}: no client could start and the run would wait forever. Set "
                          "ray.client_gpus=0 to train on CPUs, or run where Ray has a GPU.")
    raise ConfigError(f"ray.client_cpus={cfg.ray.client_cpus} is more CPUs per client than {source} has on one "
                      f"node ({cpus:g}): no client could start and the run would wait forever. Set "
                      f"ray.client_cpus to at most {cpus:g} (fractions are allowed)"
                      + (" or raise ray.num_cpus." if not cfg.ray.address else "."))


# ---- logs -----------------------------------------------------------------------------------------
def hide_reported_faults(record: logging.LogRecord) -> bool:
    """Flower logs every failed client with its traceback. An injected crash (``faults.crash``) is
    reported in the progress line and ``failures`` instead. Other errors still print.

    Also hides Flower's deprecation notice for ``run_simulation``: it is the in-process way to
    run a simulation from a Python program (a Hydra app, a test); ``flwr run`` needs the project
    packaged as a Flower app and a SuperLink process. fedcl supports both (docs/flwr_run.md), and
    a user reads the notice as something wrong with their run."""
    message = record.getMessage()
    return INJECTED_CRASH not in message and "`run_simulation` function is deprecated" not in message


# ---- the simulation, in a child process -------------------------------------------------------------
class SimulationProcess:
    """The child process a simulation runs in, started before its run is known: it boots (a
    fresh interpreter importing torch, Flower and Ray: about 2 s) while this process validates the
    config and loads the data. ``run`` hands it the run; ``cancel`` ends it unused."""

    def __init__(self):
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch or Ray threads
        jobs, self._jobs = context.Pipe(duplex=False)
        self._answers, answer = context.Pipe(duplex=False)
        self.child = context.Process(target=_simulate_in_child, args=(jobs, answer), name="fedcl-simulation")
        self.child.start()
        jobs.close()
        answer.close()

    def cancel(self) -> None:
        _stop(self.child)
        self._jobs.close()
        self._answers.close()

    def run(self, cfg: DictConfig, run_dir: str, resume: bool = False) -> None:
        """Run the simulation of ``cfg`` in the child; its exceptions are raised here."""
        child, answers = self.child, self._answers
        try:
            self._jobs.send((cfg, run_dir, resume))
            while not answers.poll(POLL_S):
                if not child.is_alive():
                    break
            outcome = answers.recv() if answers.poll(0) else None
        except (EOFError, BrokenPipeError):
            outcome = None
        except BaseException:  # Ctrl-C or the like: do not leave the simulation running
            _stop(child)
            raise
        finally:
            answers.close()
            self._jobs.close()
        if outcome == "ok":  # results.json is written; Flower and Ray shut down while the caller goes on
            _FINISHING.append(child)
            return
        child.join(EXIT_GRACE_S)
        if child.is_alive():
            _stop(child)
        if outcome is None:
            raise RuntimeLost(run_dir, f"the simulation process (the Ray driver) ended with "
                                       f"{exit_text(child.exitcode)} before the run finished; Ray ends its driver "
                                       "when the node's raylet, object store or GCS dies, and the OOM killer may "
                                       "pick it too")
        error, child_traceback = outcome
        if not isinstance(error, (ConfigError, RuntimeLost)):  # unexpected: keep the child's traceback
            error.__cause__ = ChildTraceback(child_traceback)
        raise error


def simulate(cfg: DictConfig, run_dir: str, resume: bool = False, process: SimulationProcess | None = None) -> None:
    """Run the simulation in a child process (``process``, started earlier, or a new one); its
    exceptions are raised here.

    ConfigError for resources Ray does not have (checked in the child once Ray runs, see
    ``run_simulation_here``); RuntimeLost when Ray fails under the run (the
    child then ended without an answer, or with a Ray error).
    """
    try:
        check_num_cpus(cfg)
    except BaseException:
        if process is not None:
            process.cancel()
        raise
    reap_finishing()  # the last run's Ray is gone before this one's starts
    (process or SimulationProcess()).run(cfg, run_dir, resume)


_FINISHING: list = []  # simulation processes that answered and are shutting Ray down


def reap_finishing() -> None:
    """Wait for (at most EXIT_GRACE_S, then stop) the simulation processes still shutting down:
    before the next run starts its Ray, and when this process exits."""
    while _FINISHING:
        child = _FINISHING.pop()
        child.join(EXIT_GRACE_S)
        if child.is_alive():
            _stop(child)


atexit.register(reap_finishing)


class ChildTraceback(Exception):
    """The traceback of an exception raised in the simulation process, as text."""

    def __str__(self) -> str:
        return "\n\nin the simulation process:\n" + self.args[0]


def exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit status {code}"


def _stop(child) -> None:
    child.terminate()
    child.join(EXIT_GRACE_S)
    if child.is_alive():
        child.kill()
        child.join()


def _simulate_in_child(jobs, answer) -> None:
    """The child's whole life: wait for the run, simulate, send "ok" or (exception, traceback
    text), exit at once (a server thread still waiting for replies of a crashed runtime must not
    keep it alive). "ok" goes out as soon as results.json is written: the parent need not wait
    while Flower's engine and Ray shut down (about 2 s)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg, run_dir, resume = jobs.recv()
    except (EOFError, OSError):  # the parent cancelled the run or is gone
        os._exit(0)
    jobs.close()
    answered = threading.Event()

    def results_written() -> None:
        answer.send("ok")
        answered.set()
        quiet()  # what Flower and Ray print while shutting down is not about the run

    try:
        run_simulation_here(cfg, run_dir, resume, on_results=results_written)
        outcome = "ok"
    except BaseException as err:  # noqa: BLE001 - everything goes to the parent
        outcome = (as_runtime_lost(err, run_dir), traceback.format_exc())
    try:
        pickle.loads(pickle.dumps(outcome))  # what the parent could not rebuild, it gets as text
    except Exception:  # noqa: BLE001
        error, text = outcome
        outcome = (RuntimeError(f"{type(error).__name__}: {error}"), text)
    try:
        if not answered.is_set():  # once answered, a failing shutdown changes nothing the run wrote
            answer.send(outcome)
    finally:
        answer.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def quiet() -> None:
    """Send this process's stdout and stderr (Ray's log forwarding included) to /dev/null."""
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)


def as_runtime_lost(err: BaseException, run_dir: str) -> BaseException:
    """A Ray error anywhere in ``err``'s chain means the runtime failed: RuntimeLost."""
    if isinstance(err, (ConfigError, RuntimeLost)):
        return err
    seen, cause = set(), err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if type(cause).__module__.startswith("ray."):
            return RuntimeLost(run_dir, f"Ray failed under the simulation ({type(cause).__name__}: "
                                        f"{str(cause).strip().splitlines()[0] if str(cause).strip() else ''})")
        cause = cause.__cause__ or cause.__context__
    return err


def start_local_ray(cfg: DictConfig) -> None:
    """Start fedcl's own Ray here before Flower does. Flower's backend (flwr 1.42) gives its actors a
    runtime env (PYTHONPATH) that Ray's prestarted workers lack, so each actor waited for a new
    worker process; with PYTHONPATH in the environment the raylet passes on, the actors take the
    prestarted workers. Flower finds Ray running and keeps it. A cluster (``ray.address``) is left
    to Flower: its workers' environment is the cluster's."""
    if cfg.ray.address:
        return
    import ray

    os.environ["PYTHONPATH"] = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(**{"include_dashboard": False, **ray_init_args(cfg)})


def run_simulation_here(cfg: DictConfig, run_dir: str, resume: bool = False, on_results=None) -> None:
    """The Flower simulation in this process (``simulate`` runs it in a child); ``on_results()``
    runs once results.json is written, before Flower and Ray shut down."""
    from flwr.simulation import run_simulation

    from fedcl.client.app import make_client_app
    from fedcl.experiment import get_experiment
    from fedcl.server.app import make_server_app
    from fedcl.server.schedule import largest_round

    start_local_ray(cfg)
    check_resources(cfg, *node_resources(cfg))
    # Flower logs through its own console handler; without this Hydra's root handler repeats it
    # at DEBUG level.
    logging.getLogger("flwr").propagate = False
    logging.getLogger("flwr").addFilter(hide_reported_faults)
    slots = num_slots(largest_round(cfg, get_experiment(cfg).method))
    run_simulation(server_app=make_server_app(cfg, run_dir, resume, on_results, min_nodes=slots),
                   client_app=make_client_app(cfg, run_dir), num_supernodes=slots, backend_config=backend_config(cfg))
