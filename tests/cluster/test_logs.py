"""`python -m kubetune_dev logs`: the node agent's per-pod logs, read from its state dir (no cluster needed)."""


def test_kubetune_logs_command_reads_the_agents_logs(tmp_path):
    from kubetune_dev.cli import app
    from typer.testing import CliRunner

    folder = tmp_path / "logs" / "ml" / "job-0"
    folder.mkdir(parents=True)
    (folder / "trainer.log").write_text("step 1\nstep 2\n")
    (folder / "trainer.previous.log").write_text("before the restart\n")
    runner = CliRunner()
    assert runner.invoke(app, ["logs", "job-0", "-n", "ml", "--state-dir", str(tmp_path)]).stdout == "step 1\nstep 2\n"
    previous = runner.invoke(app, ["logs", "job-0", "-n", "ml", "-p", "--state-dir", str(tmp_path)])
    assert previous.stdout == "before the restart\n"
    missing = runner.invoke(app, ["logs", "nope", "-n", "ml", "--state-dir", str(tmp_path)])
    assert missing.exit_code == 1 and "no logs for ml/nope" in missing.output
