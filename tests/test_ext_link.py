"""fastlenet._C uses the C++ runtime torch uses (the shared libstdc++), not a copy of its own.

A module with libstdc++ linked in has locale ids of its own: the first TORCH_CHECK whose message
formats a number then crashes inside std::ostream instead of raising. Seen on 2026-12-04 on a
GPU machine whose image's /opt/gcc/bin/g++ built the extension: a SIGSEGV in
std::ostream::_M_insert<long>, resolved inside _C, at "bias must have shape (16), got [15]";
a check whose message held no number raised as it should. Where this test fails, build with
the system compiler (CXX=/usr/bin/g++ CC=/usr/bin/gcc).
"""

import shutil
import subprocess

import pytest

from fastlenet import _ext

# Definitions that live in libstdc++ itself (an extern template's instance, an out-of-line
# virtual member): a module that defines one carries the library. A shared object linked with
# -static-libstdc++ that formats a long defines both; linked normally, neither.
RUNTIME_ONLY = (
    "std::ostream::_M_insert<long>(long)",
    "std::codecvt<char16_t, char, __mbstate_t>::do_unshift",
)


@pytest.mark.skipif(not _ext.LOADED, reason="needs the C++ extension")
@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils)")
def test_extension_uses_the_shared_cpp_runtime():
    import fastlenet._C as ext

    symbols = subprocess.run(
        ["nm", "-C", "--defined-only", ext.__file__], capture_output=True, text=True, check=True
    ).stdout
    carried = [name for name in RUNTIME_ONLY if name in symbols]
    assert not carried, f"{ext.__file__} defines libstdc++'s {carried}: see this file's docstring"
