"""The bad-input catalogue (``tests/bad_inputs.py``): every case fails with the expected error
whose message names what is wrong; on the command line as one ``pvae: ...`` line with the
documented exit code (2: bad usage or input)."""

import re
from pathlib import Path

import pytest
from bad_inputs import cases

IDS = [case[0] for case in cases(Path("unused"))]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("bad-inputs")


def test_catalogue_size():
    assert len(IDS) >= 60 and len(set(IDS)) == len(IDS)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case_id", IDS)
def test_bad_input(case_id, scratch):
    case = {c[0]: c for c in cases(scratch)}[case_id]
    _, category, call, expected, pattern = case
    if category == "cli":
        code, err = call()
        assert code == expected, err
        assert err.startswith("pvae: ") and err.strip().count("\n") == 0, err
        assert re.search(pattern, err), err
    else:
        with pytest.raises(expected, match=pattern):
            call()
