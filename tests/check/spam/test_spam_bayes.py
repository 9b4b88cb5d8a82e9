"""The classifier: tokens, chi-square combining, the token database, and a corpus run."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from spamkit import corpus_subset, message

from gateway.check.spam.bayes import (
    _WORD,
    ABSENT_RECHECK,
    Model,
    TokenStore,
    chi2q,
    digest,
    distinct_words,
    tokenize,
)
from gateway.check.spam.message import parse
from gateway.check.spam.scorer import Scorer


def test_tokens_are_prefixed_by_their_header_and_include_link_domains() -> None:
    html = ('<html><body><p>Cheap <b>watches</b> at '
            '<a href="http://shop.replica.example.net/buy?id=7">our shop</a></p></body></html>')
    data = message(html, content_type="text/html; charset=us-ascii",
                   headers={"Subject": "Rolex watches", "X-Mailer": "BulkMailer 3"})
    tokens = tokenize(parse(data))
    assert {"subject:rolex", "subject:watches", "x-mailer:bulkmailer", "watches",
            "url:replica.example.net", "url:example.net", "from:addr:example.com"} <= tokens
    assert "b" not in tokens and "<b>" not in tokens  # markup is not text
    assert not any(t.startswith("html:") and "watches" in t for t in tokens)


def test_our_own_verdict_header_is_not_learned() -> None:
    data = message(headers={"X-Spam-Status": "Yes, score=9.0 required=6.0 tests=BAYES_SPAM"})
    assert not any("bayes_spam" in t or "x-spam" in t for t in tokenize(parse(data)))
    assert digest(data) == digest(message())


def test_chi2q_matches_known_values() -> None:
    assert chi2q(0.0, 2) == pytest.approx(1.0)
    assert chi2q(2.0, 2) == pytest.approx(0.3679, abs=1e-4)  # e**-1
    assert chi2q(10.0, 4) == pytest.approx(0.0404, abs=1e-4)


def test_combining_leans_towards_the_class_the_tokens_were_seen_in() -> None:
    m = Model(nspam=100, nham=100, counts={"viagra": (90, 1), "meeting": (1, 80),
                                          "the": (50, 50)})
    assert m.classify({"viagra", "the"}).probability > 0.9
    assert m.classify({"meeting", "the"}).probability < 0.1
    assert m.classify({"the", "unknown"}).probability == 0.5  # no clue: unsure
    assert m.classify({"viagra", "meeting"}).probability == pytest.approx(0.5, abs=0.1)


def test_learning_is_idempotent_and_relearning_moves_a_message(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "b.sqlite")
    scorer = Scorer(store=store)
    spam = message("Cheap pills, order now\n", headers={"Subject": "pills"})
    assert scorer.learn([(spam, True)]) == 1
    assert scorer.learn([(spam, True)]) == 0  # already known as spam
    assert store.counts()[:2] == (1, 0)
    pills = store.model().counts["pills"]
    assert pills == (1, 0)
    assert scorer.learn([(spam, False)]) == 1  # an operator's correction
    assert store.counts()[:2] == (0, 1)
    assert store.model().counts["pills"] == (0, 1)
    store.close()


def test_a_learn_by_another_process_is_seen_by_a_running_scorer(tmp_path: Path) -> None:
    db = tmp_path / "b.sqlite"
    clock = [100.0]
    running = TokenStore(db, clock=lambda: clock[0])
    assert running.counts() == (0, 0, 0)  # no database yet: nothing learned, nothing created
    assert not db.exists()
    other = Scorer(store=TokenStore(db))  # e.g. `coffer spam learn` in another process
    other.learn([(message("buy pills now\n"), True), (message(), False)])
    # An absent database is looked for again at most once a second (not a stat per
    # message): the learn is seen by then.
    clock[0] += ABSENT_RECHECK
    assert running.counts()[:2] == (1, 1)
    other.learn([(message("cheap pills\n"), True)])
    assert running.counts()[:2] == (2, 1)  # an existing database: seen at once
    other.close()
    running.close()


def test_an_absent_database_is_not_looked_for_on_every_message(tmp_path: Path) -> None:
    db = tmp_path / "b.sqlite"
    clock = [100.0]
    store = TokenStore(db, clock=lambda: clock[0])
    stats: list[Path] = []
    real_exists = Path.exists

    def exists(self: Path, **kwargs: bool) -> bool:
        stats.append(self)
        return real_exists(self, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "exists", exists)
        for _ in range(50):
            assert store.model().nspam == 0
            clock[0] += 0.01
        assert stats == [db]  # once in the first half second
        clock[0] += ABSENT_RECHECK
        store.model()
        assert stats == [db, db]
    store.close()


def test_a_learn_through_the_scorers_own_store_is_seen_at_once(tmp_path: Path) -> None:
    clock = [100.0]
    scorer = Scorer(store=TokenStore(tmp_path / "b.sqlite", clock=lambda: clock[0]))
    assert scorer.store is not None and scorer.store.counts() == (0, 0, 0)
    scorer.learn([(message("buy pills now\n"), True), (message(), False)])
    assert scorer.store.counts()[:2] == (1, 1)  # the clock has not moved
    scorer.close()


def test_the_database_is_sqlite_and_a_failed_learn_changes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "b.sqlite"
    scorer = Scorer(store=TokenStore(db))
    scorer.learn([(message(), False)])

    def bad() -> object:
        yield ("d1", True, {"x"})
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        scorer.store.learn(bad())  # type: ignore[union-attr, arg-type]
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key='nspam'").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM learned").fetchone()[0] == 1
    conn.close()
    scorer.close()


def test_classifier_trained_on_a_corpus_sample_beats_the_trivial_baseline(
    corpus: Path, tmp_path: Path
) -> None:
    if not (corpus / "spam-ham" / "train").is_dir():
        pytest.skip("spam-ham corpus not found")
    train_ham = corpus_subset(corpus, "train", "ham", 150)
    train_spam = corpus_subset(corpus, "train", "spam", 150)
    test_ham = corpus_subset(corpus, "test", "ham", 100)
    test_spam = corpus_subset(corpus, "test", "spam", 100)
    scorer = Scorer(store=TokenStore(tmp_path / "b.sqlite"))
    assert scorer.learn([(m, False) for m in train_ham] + [(m, True) for m in train_spam]) == 300
    model = scorer.store.model()  # type: ignore[union-attr]

    def prob(data: bytes) -> float:
        return model.classify(tokenize(parse(data))).probability

    correct = sum(prob(m) < 0.5 for m in test_ham) + sum(prob(m) > 0.5 for m in test_spam)
    # the trivial baseline (always the majority class) is right on 100 of these 200
    assert correct >= 180, f"{correct}/200 correct"
    # and the whole scorer's verdicts agree
    spam_verdicts = sum(scorer.score(m).verdict == "spam" for m in test_spam)
    ham_verdicts = sum(scorer.score(m).verdict == "ham" for m in test_ham)
    assert spam_verdicts >= 75 and ham_verdicts >= 97, (spam_verdicts, ham_verdicts)
    scorer.close()


@settings(max_examples=500, deadline=None)
@given(text=st.one_of(
    st.text(alphabet=st.characters(max_codepoint=127), max_size=60),
    st.text(alphabet=st.sampled_from("ab1_'$.-€£ \t\n!:/@\u00e9\u2014\u00a0\u0661"),
            max_size=60)))
def test_distinct_words_are_the_word_patterns_matches(text: str) -> None:
    assert distinct_words(text) == set(_WORD.findall(text))


def test_words_keep_inner_punctuation_and_lose_the_outer() -> None:
    assert distinct_words("$100.00 don't _x_ -- e-mail. a.b.c. ...") == {
        "100.00", "don't", "x", "e-mail", "a.b.c"}
