from dashboard.common import store_url_for_display


def test_the_store_url_shown_on_pages_hides_the_password(monkeypatch):
    monkeypatch.setenv("SAMLAB_STORE", "postgresql+psycopg://samlab:s3cret@db.local:5432/runs")
    shown = store_url_for_display()
    assert "s3cret" not in shown
    assert shown == "postgresql+psycopg://samlab:***@db.local:5432/runs"


def test_a_sqlite_url_is_shown_as_it_is(monkeypatch, tmp_path):
    url = f"sqlite:///{tmp_path}/samlab.db"
    monkeypatch.setenv("SAMLAB_STORE", url)
    assert store_url_for_display() == url
