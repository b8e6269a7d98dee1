"""The rule-based sentence splitter used by --split-sentences."""
from megatron_normformer.data.sentences import split_sentences


def test_splits_on_terminal_punctuation_not_abbreviations():
    text = ('Dr. Smith arrived at 5 p.m. on Monday. He said "Hello!" Then he left... and came back? '
            'Yes. See e.g. the manual, sect. 3. J. R. R. Tolkien wrote it.\n\nNew paragraph without stop\n\n'
            'Last one.')
    assert split_sentences(text) == [
        "Dr. Smith arrived at 5 p.m. on Monday.",
        'He said "Hello!"',
        "Then he left... and came back?",
        "Yes.",
        "See e.g. the manual, sect. 3.",
        "J. R. R. Tolkien wrote it.",
        "New paragraph without stop",
        "Last one.",
    ]
    assert split_sentences("   ") == []
