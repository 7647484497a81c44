"""workers.sse.Lines: an event stream's lines, split where SSE splits them, whatever the
pieces it arrives in."""

from workers.sse import Lines

TEXT = ('data: {"text": "a\u2028b\u2029c\x85d\x0be\x0cf\x1cg"}\r\n\r\n'
        'id: 8\rdata: two\n\ndata: [DONE]\n\nopen')
LINES = ['data: {"text": "a\u2028b\u2029c\x85d\x0be\x0cf\x1cg"}', "", "id: 8", "data: two", "",
         "data: [DONE]", ""]


def lines_of(pieces, open_line=True):
    split = Lines()
    out = [line for piece in pieces for line in split.decode(piece)]
    return out + split.flush(open_line)


def test_splits_at_crlf_lf_and_cr_only_wherever_the_pieces_cut():
    for size in range(1, 9):
        assert lines_of([TEXT[i:i + size] for i in range(0, len(TEXT), size)]) == LINES + ["open"], size
    for cut in range(len(TEXT) + 1):
        assert lines_of([TEXT[:cut], TEXT[cut:]]) == LINES + ["open"], cut


def test_the_end_of_the_stream():
    assert lines_of(["a\r"]) == ["a"]                      # a lone CR ends a line
    assert lines_of(["a\r", "\nb"]) == ["a", "b"]          # a CRLF cut in two is one end
    assert lines_of(["open"], open_line=False) == []       # an SSE client drops an open line
    assert lines_of([""]) == [] and lines_of([]) == []
