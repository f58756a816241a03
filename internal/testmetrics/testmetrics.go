// Package testmetrics scrapes a real /metrics endpoint in tests, reads
// values out of it, and has promtool (Debian's prometheus package, which
// deploy/test.sh installs) check what was served.
package testmetrics

import (
	"bytes"
	"io"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Scrape is one scrape: its text and its families by name.
type Scrape struct {
	Text     []byte
	Families map[string]*dto.MetricFamily
}

// Get scrapes url (bearer: the token to present, "" for none) and fails
// the test unless it answers 200 with metrics that parse.
func Get(t testing.TB, c *http.Client, url, bearer string) Scrape {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("scrape %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape %s: %d %v\n%s", url, resp.StatusCode, err, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		t.Fatalf("scrape %s: does not parse: %v\n%s", url, err, body)
	}
	return Scrape{Text: body, Families: fams}
}

// Value is the value of the sample of name whose labels include want
// (pairs: name, value); a histogram's is its count. ok is false if there
// is no such sample.
func (s Scrape) Value(name string, want ...string) (v float64, ok bool) {
	f := s.Families[name]
	if f == nil {
		return 0, false
	}
next:
	for _, m := range f.Metric {
		labels := map[string]string{}
		for _, l := range m.Label {
			labels[l.GetName()] = l.GetValue()
		}
		for i := 0; i+1 < len(want); i += 2 {
			if labels[want[i]] != want[i+1] {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue(), true
		case m.Gauge != nil:
			return m.Gauge.GetValue(), true
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount()), true
		case m.Untyped != nil:
			return m.Untyped.GetValue(), true
		}
	}
	return 0, false
}

// Must is Value, failing the test when the sample is absent.
func (s Scrape) Must(t testing.TB, name string, want ...string) float64 {
	t.Helper()
	v, ok := s.Value(name, want...)
	if !ok {
		t.Fatalf("no sample %s%v in the scrape", name, want)
	}
	return v
}

// Promtool runs `promtool args...` with stdin and fails the test if it
// fails or prints a finding.
func Promtool(t testing.TB, stdin []byte, args ...string) {
	t.Helper()
	cmd := exec.Command("promtool", args...)
	cmd.Stdin = bytes.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	if strings.TrimSpace(string(out)) != "" && args[0] == "check" && args[1] == "metrics" {
		t.Fatalf("promtool check metrics found problems:\n%s", out)
	}
}

// NamesIn returns the metric names with prefix that the files (alerting
// rules, dashboards) use, as the families a scrape has (a histogram's
// _bucket, _sum and _count under its own name).
func NamesIn(t testing.TB, prefix string, files ...string) []string {
	t.Helper()
	re := regexp.MustCompile(`\b` + regexp.QuoteMeta(prefix) + `[a-z0-9_]+`)
	seen := map[string]bool{}
	var out []string
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range re.FindAllString(string(b), -1) {
			for _, suf := range []string{"_bucket", "_sum", "_count"} {
				if strings.HasSuffix(m, suf) && !strings.HasSuffix(m, "_total"+suf) {
					m = strings.TrimSuffix(m, suf)
					break
				}
			}
			if !seen[m] {
				seen[m] = true
				out = append(out, m)
			}
		}
	}
	return out
}
