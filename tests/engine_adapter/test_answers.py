"""The answer book: bounded, and (with a path) surviving a restart through its log, which a
crash can tear and a full or read-only disk can refuse without costing a request anything."""

from __future__ import annotations

from engine_adapter.answers import AnswerBook


def test_the_answer_book_is_bounded():
    book = AnswerBook(capacity=2)
    for i in range(3):
        book.remember("", f"answer {i}", [i])
    assert book.lookup("", "answer 0") is None and book.lookup("", "answer 2") == [2]


def test_answers_outlive_the_book_through_its_log(tmp_path):
    log = tmp_path / "answers.log"
    book = AnswerBook(8, log)
    book.remember("a", "Plant basil.", [47, 3, 70000, 2])
    book.remember("b", "Plant basil.", [9])
    book.close()
    again = AnswerBook(8, log)
    assert again.lookup("a", "Plant basil.") == [47, 3, 70000, 2]
    assert again.lookup("b", "Plant basil.") == [9]  # tenants stay apart
    assert again.lookup("a", "Plant mint.") is None and again.faults == 0


def test_replay_keeps_the_most_recent_and_compacts(tmp_path):
    log = tmp_path / "answers.log"
    book = AnswerBook(4, log)
    for i in range(40):
        book.remember("", f"answer {i}", [i, i + 1])
    book.close()
    grown = log.stat().st_size
    again = AnswerBook(4, log)  # 40 records > 4 x capacity: rewritten to the live 4
    assert [again.lookup("", f"answer {i}") for i in (35, 36, 39)] == [None, [36, 37], [39, 40]]
    assert log.stat().st_size * 9 < grown and not (tmp_path / "answers.log.tmp").exists()
    again.remember("", "answer 40", [1])  # appends to the new file
    again.close()
    assert AnswerBook(4, log).lookup("", "answer 40") == [1]


def test_a_torn_or_corrupt_record_is_skipped_not_read(tmp_path):
    log = tmp_path / "answers.log"
    book = AnswerBook(8, log)
    for i in range(3):
        book.remember("", f"answer {i}", [i] * 10)
    book.close()
    data = bytearray(log.read_bytes())
    size = len(data) // 3
    data[size + 30] ^= 0xFF  # inside the second record's ids
    log.write_bytes(bytes(data) + data[:size // 2])  # and a torn record at the end
    again = AnswerBook(8, log)
    assert again.lookup("", "answer 0") == [0] * 10
    assert again.lookup("", "answer 1") is None  # its checksum fails: never read as ids
    assert again.lookup("", "answer 2") == [2] * 10  # found again after the damage
    again.remember("", "answer 3", [3])
    again.close()
    assert AnswerBook(8, log).lookup("", "answer 3") == [3]


def test_an_unusable_log_leaves_the_book_in_memory(tmp_path):
    (tmp_path / "answers.log").mkdir()  # open fails (EISDIR), as it would on a read-only disk
    book = AnswerBook(8, tmp_path / "answers.log")
    book.remember("", "answer", [1, 2])
    assert book.lookup("", "answer") == [1, 2] and book.faults == 1


def test_two_books_on_one_log_share_it(tmp_path):
    """Two server processes on one store: each appends whole records to the same log."""
    log = tmp_path / "answers.log"
    a, b = AnswerBook(8, log), AnswerBook(8, log)
    a.remember("", "from a", [1])
    b.remember("", "from b", [2])
    a.close(), b.close()
    c = AnswerBook(8, log)
    assert c.lookup("", "from a") == [1] and c.lookup("", "from b") == [2]
