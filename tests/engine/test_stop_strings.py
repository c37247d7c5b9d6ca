import pytest

from replayllm.engine.stop_strings import StopStringFilter


def feed(stop, pieces):
    f = StopStringFilter(stop)
    shown = []
    for p in pieces:
        shown.append(f.push(p))
        if f.stopped:
            return "".join(shown), True
    return "".join(shown) + f.flush(), False


def test_no_stop_strings_passes_text_through():
    assert feed((), ["ab", "c"]) == ("abc", False)


@pytest.mark.parametrize("pieces", [["Hello ##", "# world"], ["Hel", "lo", " ", "#", "#", "#"], ["Hello ### world"]])
def test_stop_string_split_across_pieces_is_cut(pieces):
    text, stopped = feed(("###",), pieces)
    assert stopped and text == "Hello "


def test_partial_stop_prefix_is_held_back_then_released():
    f = StopStringFilter(("STOP",))
    assert f.push("abc ST") == "abc "  # "ST" could begin STOP
    assert f.push("AR") == "STAR"  # it did not
    assert not f.stopped


def test_earliest_of_several_stop_strings_wins():
    text, stopped = feed(("world", "lo w"), ["hello world"])
    assert stopped and text == "hel"
