"""Which build of the extension the tests run. CI runs the operator tests on
two builds: the regular one, whose CPU sampling loops are cloned per x86-64
level (only the clone the machine picks runs), and one built with
DCNV2_NO_VECTOR_CLONES=1, where the baseline code runs. It says which it
expects in DCNV2_EXPECT_VECTOR_CLONES, and this test checks that the
extension the tests imported is that build."""

import os

import pytest

from dcnv2_plugin import _C

EXPECTED = os.environ.get("DCNV2_EXPECT_VECTOR_CLONES")


@pytest.mark.skipif(EXPECTED is None, reason="set DCNV2_EXPECT_VECTOR_CLONES to 1 or 0 to check the build (CI does)")
def test_the_extension_is_the_expected_build():
    clones = _C.VECTOR_CLONES.split(",") if _C.VECTOR_CLONES else []
    expected = ["x86-64-v4", "x86-64-v3", "default"] if EXPECTED == "1" else []
    assert clones == expected, f"{_C.__file__} was built with vector clones {clones}, expected {expected}"
