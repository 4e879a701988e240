"""`backend="almostlinear"` works in an interpreter that never imported almostlinear."""
import subprocess
import sys
import textwrap


def test_backend_is_discovered_by_entry_point_without_import():
    script = textwrap.dedent(
        """
        import sys, torch
        assert "almostlinear" not in sys.modules
        assert "almostlinear" in torch._dynamo.list_backends(), torch._dynamo.list_backends()
        def attention(q, k, v):
            return torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1) @ v
        q, k, v = (torch.randn(2, 2, 8, 4) for _ in range(3))
        out = torch.compile(attention, backend="almostlinear", options={"inner": "eager"})(q, k, v)
        torch.testing.assert_close(out, attention(q, k, v))
        import almostlinear
        report = almostlinear.last_reports()[-1]
        assert len(report.sites) == 1 and report.sites[0].rewritten, report
        print("OK", report.sites[0].method)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK exact" in result.stdout
