"""An example payload kind, ``slogans``, as a plugin would ship it (see ``docs/writing-a-kind.md``).

The kind lives in :mod:`tests.kinds.example_kind.slogans` (probes, injector and
monitor); its demo payload package is :mod:`tests.kinds.example_kind.payload`. A
distribution makes them known to multirun through entry points::

    [multirun.injectors]
    slogans = tests.kinds.example_kind.slogans:SlogansInjector
    [multirun.monitors]
    slogans = tests.kinds.example_kind.slogans:SlogansMonitor
    [multirun.payloads]
    example-slogans = tests.kinds.example_kind.payload
"""
