package main

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kmsd-project/kmsd/internal/metrics"
)

// mcpMetrics are kmsd-mcp's Prometheus metrics: tool calls, client-token
// introspections, key fetches and its own token's renewals. It is
// hemcp.Metrics; a nil one records nothing.
type mcpMetrics struct {
	calls     *prometheus.CounterVec
	duration  *prometheus.HistogramVec
	intro     *prometheus.CounterVec
	fetches   *prometheus.CounterVec
	fetchTime prometheus.Histogram
	renewals  *prometheus.CounterVec
	expiry    prometheus.Gauge
	ttl       prometheus.Gauge
	renewable prometheus.Gauge
}

func newMCPMetrics(reg *metrics.Registry) *mcpMetrics {
	m := &mcpMetrics{
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "kmsd_mcp", Name: "tool_calls_total",
			Help: "Tool calls by tool and outcome: ok, tool_error (the input or kmsd refused), busy (refused: --max-calls evaluations running) or panic."}, []string{"tool", "outcome"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: "kmsd_mcp", Name: "tool_call_duration_seconds",
			Help: "Duration of tool calls, by tool.", Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}}, []string{"tool"}),
		intro: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "kmsd_mcp", Name: "introspections_total",
			Help: "Client tokens checked: result hit (kmsd's answer from the cache, at most --introspect-ttl old) or miss (asked of kmsd)."}, []string{"result"}),
		fetches: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "kmsd_mcp", Name: "key_fetches_total",
			Help: "Key versions' public and evaluation keys fetched from kmsd and verified against the pinned identity, by outcome (ok or error)."}, []string{"outcome"}),
		fetchTime: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: "kmsd_mcp", Name: "key_fetch_duration_seconds",
			Help: "Duration of a key version's fetch and verification.", Buckets: prometheus.ExponentialBuckets(0.01, 4, 8)}),
		renewals: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "kmsd_mcp", Name: "token_renewals_total",
			Help: "Renewals of kmsd-mcp's own token, by outcome: ok, error (retried) or refused (at its max_lifetime: it needs a new token)."}, []string{"outcome"}),
		expiry: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: "kmsd_mcp", Name: "token_expiry_timestamp_seconds",
			Help: "When kmsd-mcp's own token expires unless renewed (0: it does not expire)."}),
		ttl: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: "kmsd_mcp", Name: "token_ttl_seconds",
			Help: "The lifetime each renewal of kmsd-mcp's own token gives (its ttl; before the first renewal, what was left at start). It renews at two thirds: less than a quarter left means renewals fail."}),
		renewable: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: "kmsd_mcp", Name: "token_renewable",
			Help: "1 while kmsd-mcp's own token can still renew, 0 once kmsd refused a renewal (its max_lifetime reached, or made without one)."}),
	}
	for _, o := range []string{"hit", "miss"} {
		m.intro.WithLabelValues(o)
	}
	for _, o := range []string{"ok", "error"} {
		m.fetches.WithLabelValues(o)
	}
	for _, o := range []string{"ok", "error", "refused"} {
		m.renewals.WithLabelValues(o)
	}
	m.renewable.Set(1)
	reg.MustRegister(m.calls, m.duration, m.intro, m.fetches, m.fetchTime, m.renewals, m.expiry, m.ttl, m.renewable)
	return m
}

func (m *mcpMetrics) ToolCall(tool, outcome string, d time.Duration) {
	if m == nil {
		return
	}
	m.calls.WithLabelValues(tool, outcome).Inc()
	m.duration.WithLabelValues(tool).Observe(d.Seconds())
}

func (m *mcpMetrics) Introspection(cached bool) {
	if m == nil {
		return
	}
	if cached {
		m.intro.WithLabelValues("hit").Inc()
	} else {
		m.intro.WithLabelValues("miss").Inc()
	}
}

func (m *mcpMetrics) KeyFetch(d time.Duration, err error) {
	if m == nil {
		return
	}
	if err != nil {
		m.fetches.WithLabelValues("error").Inc()
	} else {
		m.fetches.WithLabelValues("ok").Inc()
	}
	m.fetchTime.Observe(d.Seconds())
}

// renewed is one renewal of the server's own token: its outcome, the
// expiry and ttl it gave (zero: unchanged).
func (m *mcpMetrics) renewed(outcome string, expires time.Time, ttl time.Duration) {
	if m == nil {
		return
	}
	m.renewals.WithLabelValues(outcome).Inc()
	if !expires.IsZero() {
		m.expiry.Set(float64(expires.Unix()))
	}
	if ttl > 0 {
		m.ttl.Set(ttl.Seconds())
	}
	if outcome == "refused" {
		m.renewable.Set(0)
	}
}
