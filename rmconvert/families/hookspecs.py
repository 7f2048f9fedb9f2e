"""The plugin contract: pluggy markers and the hooks an rmconvert plugin may implement."""

from __future__ import annotations

import pluggy

PROJECT = "rmconvert"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def rmconvert_register_architectures(register) -> None:
    """Describe the model families this plugin converts.

    :param register: call ``register(architecture)`` once for each
        :class:`rmconvert.Architecture` instance the plugin provides. Registering a name or a
        ``model_type`` that another plugin already registered is an error naming both plugins.
    """


@hookspec
def rmconvert_register_checks(register) -> None:
    """Contribute checks to ``rmconvert validate``.

    :param register: call ``register(check)`` with a function ``check(subject)`` that takes a
        :class:`rmconvert.doctor.findings.Subject` and yields :class:`rmconvert.doctor.findings.Finding` objects.
        Give the findings the plugin's own code prefix; ``RM`` codes belong to rmconvert.
    """
