"""One exception type for bad user input, so the CLI can print it without a traceback."""


class ConfigError(ValueError):
    """A configuration value a user must change; the message names the value and what is allowed."""


class RuntimeLost(RuntimeError):
    """The Ray runtime under the simulation failed beyond what retrying clients can repair. The run's
    checkpoint (after its last completed round) is intact: ``fedcl resume=<run dir>`` continues it."""

    def __init__(self, run_dir: str, what: str):
        self.run_dir, self.what = str(run_dir), what
        super().__init__(f"{what}. The Ray runtime under the simulation failed and fedcl cannot recover it "
                         f"by asking clients again. The checkpoint in {self.run_dir} is intact (it holds every "
                         f"completed round); continue the run with: fedcl resume={self.run_dir}")

    def __reduce__(self):  # it crosses a process boundary (fedcl.runtime.simulation): rebuild from both parts
        return type(self), (self.run_dir, self.what)
