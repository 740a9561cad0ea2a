"""The one aiohttp adapter: pinned to the aiohttp code it relies on."""

from __future__ import annotations

import hashlib
import inspect

import aiohttp
from aiohttp import web

from balancer import httpserver

# sha256 of the source of each aiohttp function balancer/httpserver.py builds on, as read in
# aiohttp 3.14.5. JsonErrorRunner overrides AppRunner._make_server (called by
# BaseRunner.setup), builds a web.Server from the base server's public attributes and
# replaces Server.__call__ to create its RequestHandler subclass, which overrides
# handle_error, and data_received and connection_lost to time a request head (reading the
# ``_waiter`` future that RequestHandler.start awaits between requests). The ports are
# bound before the apps start and served by a BaseSite subclass (start, stop, and the
# runner's addresses read its ``_server``).
FINGERPRINTS = {
    "AppRunner._make_server": (web.AppRunner._make_server,
                               "2d5358865abd00e34faa0ba952f8be77a51dfbb05c4175e6aabdb8c296228308"),
    "BaseRunner.setup": (web.BaseRunner.setup,
                         "4ceee18981cfca3adb8bbee904a57373ff28376d2ce0e2c05ddeaed4f3ce19ae"),
    "Server.__init__": (web.Server.__init__,
                        "ceb06418afb91a22338248eb671a6d54c269658731c60c07ac15e1f87b2af5ce"),
    "Server.__call__": (web.Server.__call__,
                        "c5700549e688b1642127dabf810686e87af8acb2be722a02847646ffd1b31401"),
    "RequestHandler.handle_error": (
        web.RequestHandler.handle_error,
        "94962ffef500c17222910ffeb4dc46ab273ed0bce8622472138f316d4a5cb1f6"),
    "RequestHandler.data_received": (
        web.RequestHandler.data_received,
        "1ee57ebe052e6c80ced26c96e4ccb1223172e1d55afba460353c5e414914d3f6"),
    "RequestHandler.start": (
        web.RequestHandler.start,
        "2e565fd40c8e04fb3afb481d5ba52691a61d28396573b4b8a4cf3b168782288e"),
    "RequestHandler.connection_lost": (
        web.RequestHandler.connection_lost,
        "df2fe6e95fd04c7caf0611ecabbe58f85ee08e38b9a6ce24ef85e0c8dba5b86d"),
    "BaseSite.start": (web.BaseSite.start,
                       "8dcebeed1ae05654e72f71da7e208bc0814512276a72f995e601d72772da5dfe"),
    "BaseSite.stop": (web.BaseSite.stop,
                      "c92f18307773ff035a579fb9854a7577e0dbdf20f5f138424e7c27de29345be2"),
    "BaseRunner.addresses": (
        web.BaseRunner.addresses.fget,
        "3ed54ce3769cb77e2347e7c6ad835b3884a74526852f68400437f18d6d7a3222"),
}


def test_aiohttp_is_a_version_the_adapter_was_checked_against():
    """The installed aiohttp is within the versions httpserver.py names."""
    version = tuple(int(part) for part in aiohttp.__version__.split(".")[:2])
    low, high = httpserver.SUPPORTED_AIOHTTP
    assert low <= version <= high, (
        f"aiohttp {aiohttp.__version__} is outside {low}-{high}: re-check "
        "balancer/httpserver.py (JsonErrorRunner._make_server) and update SUPPORTED_AIOHTTP")


def test_the_aiohttp_code_the_adapter_relies_on_is_unchanged():
    """Each aiohttp function the adapter builds on has the source it was written against."""
    changed = {}
    for name, (function, expected) in FINGERPRINTS.items():
        digest = hashlib.sha256(inspect.getsource(function).encode()).hexdigest()
        if digest != expected:
            changed[name] = digest
    assert not changed, (
        f"aiohttp {aiohttp.__version__} changed {', '.join(changed)}: re-check "
        f"balancer/httpserver.py against it, then record the new fingerprints {changed}")


async def test_the_runner_serves_with_the_json_error_handler():
    """A started runner's server is the adapter's, and its connections use its handler."""
    app = web.Application()
    runner = httpserver.make_runner(app, proxy=True, max_header_bytes=1024)
    await runner.setup()
    try:
        server = runner.server
        assert isinstance(server, httpserver._JsonErrorServer)
        assert server.handler_cancellation is True
        assert isinstance(server(), httpserver._JsonErrorHandler)
    finally:
        await runner.cleanup()
