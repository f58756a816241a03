package main

import (
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/internal/testetcd"
	"github.com/kmsd-project/kmsd/internal/testmetrics"
)

// TestMetrics scrapes a real kmsd's /metrics around real requests: each
// counter moves by exactly what the requests did, labels carry route
// patterns (never a key name, a path or a token), the bearer token is
// required, and promtool finds nothing to say about what is served.
func TestMetrics(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	tokFile := filepath.Join(t.TempDir(), "metrics.token")
	const bearer = "scrape-me-0123456789abcdef"
	if err := os.WriteFile(tokFile, []byte(bearer+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	maddr := freeAddr(t)
	p := start(t, dir, "--metrics-addr", maddr, "--metrics-token-file", tokFile, "--audit-archive", filepath.Join(t.TempDir(), "archive"))
	p.waitReady(t)
	c := adminClient(t, p, dir)
	url := "http://" + maddr + "/metrics"
	hc := &http.Client{}

	// Without the token, or with another, nothing is served.
	for _, h := range []string{"", "Bearer wrong-token-0123456789", "Basic " + bearer} {
		req, _ := http.NewRequest(http.MethodGet, url, nil)
		if h != "" {
			req.Header.Set("Authorization", h)
		}
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized || strings.Contains(string(body), "kmsd_") {
			t.Fatalf("scrape with Authorization %q: %d\n%s", h, resp.StatusCode, body)
		}
	}

	const keyName = "metrics-secret-name-7f3a"
	if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: keyName, Kind: "ml-dsa-65"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"*"}, TTL: "2h"}); err != nil {
		t.Fatal(err)
	}
	before := testmetrics.Get(t, hc, url, bearer)
	testmetrics.Promtool(t, before.Text, "check", "metrics")

	const gets, signs, strays = 5, 2, 3
	for range gets {
		if _, err := c.GetKey(ctx, keyName); err != nil {
			t.Fatal(err)
		}
	}
	for range signs {
		if _, err := c.Sign(ctx, keyName, []byte("m"), nil); err != nil {
			t.Fatal(err)
		}
	}
	// Paths no route matches, one carrying what looks like a secret.
	pc, err := p.client(t, "")
	if err != nil {
		t.Fatal(err)
	}
	for i := range strays {
		req, _ := http.NewRequest(http.MethodGet, p.url()+"/v1/no-such/SECRET-IN-PATH-"+string(rune('a'+i)), nil)
		if resp, err := pc.HTTPClient().Do(req); err == nil {
			resp.Body.Close()
		}
	}
	if _, err := c.GetKey(ctx, "absent-key"); err == nil {
		t.Fatal("absent key found")
	}
	// A change refused inside its transaction (409: version 1 is not
	// scheduled for destruction) is a rollback, not a store error.
	if _, err := c.VersionAction(ctx, keyName, 1, "cancel-destroy", 0); client.StatusOf(err) != 409 {
		t.Fatalf("cancel-destroy of an enabled version: %v", err)
	}
	after := testmetrics.Get(t, hc, url, bearer)
	testmetrics.Promtool(t, after.Text, "check", "metrics")

	delta := func(name string, labels ...string) float64 {
		t.Helper()
		b, _ := before.Value(name, labels...)
		return after.Must(t, name, labels...) - b
	}
	checks := []struct {
		name   string
		labels []string
		want   float64
	}{
		{"kmsd_http_requests_total", []string{"route", "/v1/keys/{name}", "method", "GET", "code", "200"}, gets},
		{"kmsd_http_requests_total", []string{"route", "/v1/keys/{name}", "method", "GET", "code", "404"}, 1},
		{"kmsd_http_requests_total", []string{"route", "/v1/keys/{name}/sign", "method", "POST", "code", "200"}, signs},
		{"kmsd_http_requests_total", []string{"route", "unmatched", "method", "GET", "code", "404"}, strays},
		{"kmsd_http_request_duration_seconds", []string{"route", "/v1/keys/{name}/sign", "method", "POST"}, signs},
		// One record per request, each durable before its answer.
		{"kmsd_audit_request_records_total", []string{"outcome", "written"}, gets + signs + strays + 2},
		{"kmsd_audit_request_records_total", []string{"outcome", "failed"}, 0},
		// The first signature unseals the key in the HSM, the second finds it cached.
		{"kmsd_cache_requests_total", []string{"cache", "private_key", "result", "miss"}, 1},
		{"kmsd_cache_requests_total", []string{"cache", "private_key", "result", "hit"}, signs - 1},
		{"kmsd_hsm_operations_total", []string{"op", "unseal", "outcome", "error"}, 0},
		{"kmsd_http_requests_total", []string{"route", "/v1/keys/{name}/versions/{version}/cancel-destroy", "method", "POST", "code", "409"}, 1},
		{"kmsd_store_transaction_duration_seconds", []string{"outcome", "rollback"}, 1},
	}
	for _, ch := range checks {
		if got := delta(ch.name, ch.labels...); got != ch.want {
			t.Errorf("%s%v moved by %v, want %v", ch.name, ch.labels, got, ch.want)
		}
	}
	if d := delta("kmsd_hsm_operations_total", "op", "unseal", "outcome", "ok"); d < 1 {
		t.Errorf("no unseal counted for the first signature (moved by %v)", d)
	}
	if d := delta("kmsd_hsm_operation_duration_seconds", "op", "unseal"); d < 1 {
		t.Errorf("no unseal timed (moved by %v)", d)
	}
	for _, g := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"kmsd_hsm_up", nil, 1},
		{"kmsd_leader", []string{"role", "checkpoints"}, 1},
		{"kmsd_leader", []string{"role", "destruction"}, 1},
		{"kmsd_build_info", nil, 1},
		// The 2 h token is short-lived, not a credential about to lapse.
		{"kmsd_tokens_expiring", []string{"within", "24h", "renewable", "false"}, 0},
		{"kmsd_audit_wal_size_bytes", nil, 16 << 20},
		{"kmsd_store_conflicts_total", nil, 0},
	} {
		if got := after.Must(t, g.name, g.labels...); got != g.want {
			t.Errorf("%s%v = %v, want %v", g.name, g.labels, got, g.want)
		}
	}
	// The log's size is read at most every 5 s, so the two scrapes may
	// show one reading: at least the records of the key's and the
	// token's creation, and a checkpoint never past the log.
	if n, cp := after.Must(t, "kmsd_audit_log_records"), after.Must(t, "kmsd_audit_checkpoint_records"); n < 2 || cp > n {
		t.Errorf("audit log of %v records, checkpoint of %v", n, cp)
	}
	// The key's and the token's creation (before the first scrape; the
	// reads after it write nothing to bbolt: their records wait in the
	// audit journal).
	if n := after.Must(t, "kmsd_store_transaction_duration_seconds", "outcome", "ok"); n < 2 {
		t.Errorf("%v store transactions counted, want at least 2", n)
	}
	if _, ok := after.Value("kmsd_store_transaction_duration_seconds", "outcome", "error"); ok {
		t.Error("a store error was counted")
	}

	// Requests past the address limit (5/s, bursts of 50) are labelled
	// rate_limited, not unmatched, and counted once each.
	for range 80 {
		if resp, err := pc.HTTPClient().Get(p.url() + "/v1/keys"); err == nil {
			resp.Body.Close()
		}
	}
	limited := testmetrics.Get(t, hc, url, bearer)
	n429 := limited.Must(t, "kmsd_http_requests_total", "route", "rate_limited", "method", "GET", "code", "429")
	if n := limited.Must(t, "kmsd_http_rate_limited_total", "scope", "address"); n429 < 1 || n != n429 {
		t.Errorf("%v requests labelled rate_limited, %v address refusals counted", n429, n)
	}

	// Every kmsd metric the alerting rules and the dashboard use is one
	// kmsd serves (the etcd watch's only on etcd: TestReplicaMetrics).
	for _, name := range testmetrics.NamesIn(t, "kmsd_", "../../deploy/prometheus/alerts.yml", "../../deploy/grafana/kmsd.json") {
		if strings.HasPrefix(name, "kmsd_mcp_") || name == "kmsd_store_watch_silence_seconds" || name == "kmsd_store_cache_staleness_seconds" {
			continue
		}
		if after.Families[name] == nil {
			t.Errorf("deploy/ uses %s, which kmsd does not serve", name)
		}
	}
	// No label value is a key name, a path or a token.
	admin, _ := os.ReadFile(filepath.Join(dir, "admin.token"))
	for _, leak := range []string{keyName, "SECRET-IN-PATH", "absent-key", strings.TrimSpace(string(admin)), bearer} {
		if strings.Contains(string(after.Text), leak) {
			t.Errorf("the metrics carry %q", leak)
		}
	}
}

// TestMetricsAddrRefusals: metrics off loopback need protection, and a
// token file readable by others is refused.
func TestMetricsAddrRefusals(t *testing.T) {
	tokFile := filepath.Join(t.TempDir(), "metrics.token")
	if err := os.WriteFile(tokFile, []byte("0123456789abcdef0123\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	short := filepath.Join(t.TempDir(), "short.token")
	if err := os.WriteFile(short, []byte("short\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--metrics-addr", "0.0.0.0:9420"}, "not a loopback address"},
		{[]string{"--metrics-addr", "0.0.0.0:9420", "--insecure-http", "--metrics-token-file", short}, "over TLS only"},
		{[]string{"--metrics-token-file", short}, "needs --metrics-addr"},
		{[]string{"--metrics-addr", "nonsense"}, "must be host:port"},
		{[]string{"--metrics-addr", "127.0.0.1:0", "--metrics-token-file", tokFile}, "lets others read it"},
		{[]string{"--metrics-addr", "127.0.0.1:0", "--metrics-token-file", short}, "at least 16 characters"},
	} {
		exitsWith(t, filepath.Join(t.TempDir(), "data"), tc.want, tc.args...)
	}
}

// TestAlertRules: the alerting rules load, and each alert fires on the
// series that should fire it and not on a healthy kmsd (promtool test
// rules over deploy/prometheus/alerts_test.yml).
func TestAlertRules(t *testing.T) {
	testmetrics.Promtool(t, nil, "check", "rules", "../../deploy/prometheus/alerts.yml")
	testmetrics.Promtool(t, nil, "test", "rules", "../../deploy/prometheus/alerts_test.yml")
}

// TestReplicaMetrics: three replicas on etcd, each serving metrics. Every
// elected role is led by exactly one of them, each hears from etcd, and
// when the replica leading the checkpoints is killed with SIGKILL another
// takes the role over, as kmsd_leader shows (the KmsdNoLeader alert's
// series).
func TestReplicaMetrics(t *testing.T) {
	c := testetcd.Start(t, 1)
	dirs := []string{t.TempDir(), t.TempDir(), t.TempDir()}
	maddrs := make([]string, 3)
	ps := make([]*proc, 3)
	for i := range ps {
		maddrs[i] = freeAddr(t)
		tokenOf := dirs[0]
		if i == 0 {
			tokenOf = ""
		}
		ps[i] = startReplica(t, c, nil, dirs[i], tokenOf, "--metrics-addr", maddrs[i])
		ps[i].waitReady(t)
	}
	hc := &http.Client{Timeout: 5 * time.Second}
	scrape := func(i int) testmetrics.Scrape { return testmetrics.Get(t, hc, "http://"+maddrs[i]+"/metrics", "") }
	// leaders returns, per role, which of the replicas alive lead it.
	leaders := func(alive []int) map[string][]int {
		out := map[string][]int{}
		for _, i := range alive {
			s := scrape(i)
			for _, m := range s.Families["kmsd_leader"].GetMetric() {
				if m.GetGauge().GetValue() == 1 {
					role := m.GetLabel()[0].GetValue()
					out[role] = append(out[role], i)
				}
			}
		}
		return out
	}
	settle := func(alive []int, roles ...string) map[string][]int {
		t.Helper()
		var got map[string][]int
		deadline := time.Now().Add(30 * time.Second)
		for time.Now().Before(deadline) {
			got = leaders(alive)
			ok := true
			for _, r := range roles {
				ok = ok && len(got[r]) == 1
			}
			if ok {
				return got
			}
			time.Sleep(200 * time.Millisecond)
		}
		t.Fatalf("roles %v not led by exactly one replica of %v: %v", roles, alive, got)
		return nil
	}
	got := settle([]int{0, 1, 2}, "checkpoints", "destruction", "kek")
	for i := range ps {
		s := scrape(i)
		testmetrics.Promtool(t, s.Text, "check", "metrics")
		if silence := s.Must(t, "kmsd_store_watch_silence_seconds"); silence > 5 {
			t.Errorf("replica %d last heard from etcd %v s ago", i, silence)
		}
		if stale := s.Must(t, "kmsd_store_cache_staleness_seconds"); stale > 1 {
			t.Errorf("replica %d's caches %v s behind", i, stale)
		}
	}
	lead := got["checkpoints"][0]
	ps[lead].cmd.Process.Kill()
	var alive []int
	for i := range ps {
		if i != lead {
			alive = append(alive, i)
		}
	}
	// The lease (etcd.LeaseTTL) runs out, and another replica leads.
	after := settle(alive, "checkpoints")
	if after["checkpoints"][0] == lead {
		t.Fatal("the killed replica still leads")
	}
}

// TestMetricsAddrTakenTwice: two flags naming one address stop kmsd
// before it writes anything (the trial binds were made one at a time
// and closed, so both passed, and kmsd made its data dir and admin token
// before the second real listen failed).
func TestMetricsAddrTakenTwice(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	a := freeAddr(t)
	exitsWith(t, dir, "address already in use", "--debug-addr", a, "--metrics-addr", a)
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("the data dir was made: %v", err)
	}
}
