"""How jobq's Lua scripts are put together (:mod:`jobq.scripts`): each is sent with the helpers
of lib.lua it needs, and only those (a script run cold pays for every helper it defines)."""

from __future__ import annotations

from importlib import resources

import pytest
import redis

from jobq import scripts

LIB = resources.files("jobq").joinpath("lua", "lib.lua").read_text("utf-8")

SYNTHETIC = """\
-- a preamble, sent with every script
local function a()
  return 1
end
-- b: calls a (but c only in this comment)
local function b() return a() end
local function c() return 3 end
local later
local function d() return later() end
later = function() return b() end
local function e() return 'c' end
"""


def test_a_script_gets_the_helpers_it_calls_and_theirs_in_order() -> None:
    preamble, units = scripts.split_lib(SYNTHETIC)
    assert preamble == "-- a preamble, sent with every script\n"
    assert [name for name, _ in units] == ["a", "b", "c", "later", "d", "later", "e"]

    assert scripts.shake(SYNTHETIC, "return b()") == (
        preamble + "local function a()\n  return 1\nend\n-- b: calls a (but c only in this "
        "comment)\nlocal function b() return a() end\n")
    # the forward declaration and its definition travel together, with what the latter calls
    shaken = scripts.shake(SYNTHETIC, "return d()")
    assert [n for n, text in units if text in shaken] == ["a", "b", "later", "d", "later"]
    # a name in a string may be a key or a field: kept (more than needed, never less)
    assert "local function c()" in scripts.shake(SYNTHETIC, "return e()")
    assert "local function c()" not in scripts.shake(SYNTHETIC, "-- c()\nreturn 1")
    assert scripts.shake(SYNTHETIC, "return 1") == preamble


@pytest.mark.parametrize("odd", ["redis.call('DEL', 'k')", "local x, y = 1, 2", "if a then"])
def test_lib_lua_holds_definitions_of_one_name_only(odd: str) -> None:
    # a statement would go only with the helper before it, a second name unseen
    with pytest.raises(ValueError, match="is not one top-level definition"):
        scripts.split_lib(SYNTHETIC + odd + "\n")


def test_every_script_defines_each_helper_it_uses() -> None:
    _, units = scripts.split_lib(LIB)
    defined = {name for name, _ in units}
    for name, source in scripts.SOURCES.items():
        kept = {n for n, text in units if text in source}
        missing = (scripts.used_names(source) & defined) - kept
        assert not missing, f"{name}.lua uses {missing} without its definition"


def test_a_script_leaves_out_the_helpers_it_does_not_use() -> None:
    assert "local function server_ms()" in scripts.SOURCES["idle"]
    assert "resolve_children" not in scripts.SOURCES["idle"]
    assert "resolve_children" in scripts.SOURCES["ack"]
    # lib.lua's preamble (its comments, and anything before its first helper) goes to all
    preamble, _ = scripts.split_lib(LIB)
    assert all(preamble in source for source in scripts.SOURCES.values())


def test_every_script_compiles_on_the_server(r: redis.Redis) -> None:
    for name, source in scripts.SOURCES.items():
        assert r.script_load(source), name


# -- packing -------------------------------------------------------------------------------

#: What jobq's scripts are sent: names, keys, ids (str, and bytes that are not UTF-8), counts,
#: times (ms as ints, seconds as floats), JSON with non-ASCII text, empty strings.
ARGS = ("EVALSHA", "0" * 40, 2, "{jobq}:jobs", "{jobq}:q:é", b"id\xff\xfe", -3, 0, 2**62,
        1764470000123, 1764470000.123456, 0.1, '{"t":"m:f","a":["ü",1.5]}', "")


def test_commands_are_packed_as_redis_py_packs_them_in_one_buffer(r: redis.Redis) -> None:
    conn = r.connection_pool.get_connection()
    try:
        commands = [ARGS, ("EVALSHA", "1" * 40, 1, "x" * 10_000), ("PING",)]
        packed = scripts.pack(conn, commands)
        assert packed == [b"".join(conn.pack_commands(commands))]
        # redis-py's own packing sends a value over its buffer size as a piece of its own
        assert len(conn.pack_commands(commands)) > 1
    finally:
        r.connection_pool.release(conn)


def test_what_hiredis_does_not_pack_is_packed_by_redis_py(r: redis.Redis) -> None:
    conn = r.connection_pool.get_connection()
    try:
        # a bytearray: redis-py converts it, hiredis refuses it
        assert scripts.pack(conn, [("SET", "k", bytearray(b"v"))]) == \
            conn.pack_commands([("SET", "k", b"v")])
        # a str that is not UTF-8 (a lone surrogate): redis-py's error, as before
        with pytest.raises(UnicodeEncodeError):
            scripts.pack(conn, [("SET", "k", "\udcff")])
    finally:
        r.connection_pool.release(conn)
