package app

import (
	"context"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kmsd-project/kmsd/hsm"
	"github.com/kmsd-project/kmsd/internal/metrics"
	"github.com/kmsd-project/kmsd/store"
)

// kmsd's metrics: what the API, the HSM and the store report as they go
// (counters and histograms fed by their observers), and what a scrape
// reads from the service, the audit log and the archive (collect).

// Buckets of the request histogram: most requests take milliseconds; HE
// keyset generations answered inline take seconds.
var httpBuckets = []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 120}

// Buckets of the HSM and store histograms: a PKCS#11 call or an fsync
// takes from tens of microseconds to a few milliseconds; a slow device
// or a remote HSM far more.
var opBuckets = prometheus.ExponentialBuckets(0.00005, 4, 10) // 50 µs to 13 s

// tokenScanEvery bounds how often a scrape reads every token record, and
// auditReadEvery how often it reads the audit log's size and checkpoint.
const (
	tokenScanEvery = time.Minute
	auditReadEvery = 5 * time.Second
)

type appMetrics struct {
	a *App

	requests    *prometheus.CounterVec
	duration    *prometheus.HistogramVec
	limited     *prometheus.CounterVec
	audited     *prometheus.CounterVec
	hsmOps      *prometheus.CounterVec
	hsmDuration *prometheus.HistogramVec
	txDuration  *prometheus.HistogramVec
	conflicts   prometheus.Counter
	leader      *prometheus.GaugeVec

	mu         sync.Mutex
	auditAt    time.Time // when the audit log's size and checkpoint were last read
	auditOK    bool
	auditSize  uint64
	cpSize     uint64    // the newest checkpoint's size, as last read
	behindFrom time.Time // since when records wait uncovered by a checkpoint of size cpSize; zero: none wait
	tokAt      time.Time // the last token scan
	tokErr     bool
	tokCounts  []tokenCount
	tokSoonest time.Time
}

type tokenCount struct {
	within          string
	renewable, last int
}

// Descriptors of what a scrape reads.
var (
	descCache        = desc("cache_requests_total", "Lookups in the service's caches: private_key (a miss unseals in the HSM) and record (key headers, versions, tokens: a miss reads the store; stale: read from the store because the replica's change feed was not fresh within the bound).", "cache", "result")
	descGenRunning   = desc("he_generations_running", "HE keyset generations running now.")
	descGenSlots     = desc("he_generation_slots", "HE keyset generations that may run at once (--he-generations).")
	descGenRefused   = desc("he_generations_refused_total", "HE keyset generations refused because every slot was taken (answered 429, or a scheduled rotation left for later).")
	descHSMUp        = desc("hsm_up", "1 while the HSM answers, 0 while kmsd reconnects to it.")
	descHSMReconnect = desc("hsm_reconnects_total", "Connections to the HSM re-established after it was lost.")
	descAuditSize    = desc("audit_log_records", "Records in the audit log.")
	descCPSize       = desc("audit_checkpoint_records", "Records the newest signed checkpoint covers.")
	descUncovered    = desc("audit_uncheckpointed_records", "Records no signed checkpoint covers yet.")
	descBehind       = desc("audit_checkpoint_behind_seconds", "How long records have waited for a signed checkpoint to cover them (0 while none waits), as seen at scrapes.")
	descWALUsed      = desc("audit_wal_used_bytes", "Bytes of the audit write-ahead log that records not yet moved into the store use.")
	descWALSize      = desc("audit_wal_size_bytes", "Size of the audit write-ahead log (--audit-wal-mib).")
	descArchived     = desc("audit_archive_records", "Records the audit archive's checkpoint covers.")
	descArchiveLag   = desc("audit_archive_lag_records", "Records the store's newest checkpoint covers that the archive does not hold yet.")
	descArchiveFail  = desc("audit_archive_failing_seconds", "How long writing the archive has been failing (0: it is not).")
	descPruned       = desc("audit_pruned_below_records", "The store holds no audit record below this index (retention): they are read from the archive.")
	descTokExpiring  = desc("tokens_expiring", "Live tokens whose lifetime is longer than the window and whose expiry falls within it (long-lived credentials about to lapse); renewable=\"true\": they can still renew past it.", "within", "renewable")
	descTokSoonest   = desc("token_final_expiry_timestamp_seconds", "The earliest time a live token stops working for good (its expiry, or its max_lifetime if it renews); absent when no token expires.")
	descTokScanErr   = desc("token_scan_failed", "1 if the last read of the token records for kmsd_tokens_expiring failed.")
	descRotations    = desc("scheduled_rotations_total", "Scheduled rotations this process ran, by outcome: ok (a version committed) or error (the key stays due and is tried again).", "outcome")
	descOverdueKeys  = desc("rotation_overdue_keys", "Keys due for scheduled rotation still without a new version when the last scan ended (on the replica that leads rotation; 0 elsewhere).")
	descOverdueSecs  = desc("rotation_overdue_seconds", "How far past its next_rotation_time the most overdue key was at the last scan.")
	descLastScan     = desc("rotation_last_scan_timestamp_seconds", "When the last scan for keys due for rotation that read every key header started (absent until this process completes one as the rotation leader).")
	descScanFailures = desc("rotation_scan_failures_total", "Scans for keys due for rotation that could not list the keys (the store is down, or a key header does not open): nothing after the failing page is rotated.")
	descWatchSilence = desc("store_watch_silence_seconds", "Seconds since the etcd watch last heard from the cluster (an event or a progress notice).")
	descStaleness    = desc("store_cache_staleness_seconds", "How far the replica's caches may lag etcd: seconds since its newest heartbeat seen back by its watch was sent. Above 1 s (the bound) cached records are not served: they are read from etcd.")
)

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc("kmsd_"+name, help, labels, nil)
}

// newMetrics registers kmsd's metrics on reg and hooks the observers of
// the sealer and the store.
func newMetrics(a *App, reg *metrics.Registry) *appMetrics {
	m := &appMetrics{a: a,
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "kmsd", Name: "http_requests_total",
			Help: "Requests answered, by route pattern (never a path), method and status code."}, []string{"route", "method", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: "kmsd", Name: "http_request_duration_seconds",
			Help: "Time from a request's arrival to its answer (its audit record durable), by route pattern and method.", Buckets: httpBuckets}, []string{"route", "method"}),
		limited: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "kmsd", Name: "http_rate_limited_total",
			Help: "Requests refused with 429: scope address (no valid token, --unauth-rate-limit) or token (--token-rate-limit)."}, []string{"scope"}),
		audited: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "kmsd", Name: "audit_request_records_total",
			Help: "Requests' audit records: written (durable before the answer) or failed (the request was answered 503 and not carried out)."}, []string{"outcome"}),
		hsmOps: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "kmsd", Name: "hsm_operations_total",
			Help: "Operations on the PKCS#11 token, by operation and outcome (ok or error)."}, []string{"op", "outcome"}),
		hsmDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: "kmsd", Name: "hsm_operation_duration_seconds",
			Help: "Duration of operations on the PKCS#11 token.", Buckets: opBuckets}, []string{"op"}),
		txDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: "kmsd", Name: "store_transaction_duration_seconds",
			Help: "Duration of the store's write transactions (bbolt: to fsync; etcd: the round trip), by outcome: ok, error (the store failed), rollback (the change was refused before commit), or conflict (lost to another replica's write, retried).", Buckets: opBuckets}, []string{"outcome"}),
		conflicts: prometheus.NewCounter(prometheus.CounterOpts{Namespace: "kmsd", Name: "store_conflicts_total",
			Help: "Write transactions that lost a compare to another replica's write and were retried (etcd)."}),
		leader: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: "kmsd", Name: "leader",
			Help: "1 while this process leads the role's background work (checkpoints, destruction, archive, kek, rotation, blobs), 0 otherwise."}, []string{"role"}),
	}
	for _, o := range []string{"written", "failed"} {
		m.audited.WithLabelValues(o)
	}
	for _, s := range []string{"address", "token"} {
		m.limited.WithLabelValues(s)
	}
	reg.MustRegister(m.requests, m.duration, m.limited, m.audited, m.hsmOps, m.hsmDuration, m.txDuration, m.conflicts, m.leader, m)
	if s, ok := a.cfg.Sealer.(*hsm.Sealer); ok {
		for _, op := range []string{"seal", "unseal", "ping"} {
			m.hsmOps.WithLabelValues(op, "ok")
			m.hsmOps.WithLabelValues(op, "error")
		}
		s.SetObserver(func(op string, d time.Duration, err error) {
			out := "ok"
			if err != nil {
				out = "error"
			}
			m.hsmOps.WithLabelValues(op, out).Inc()
			m.hsmDuration.WithLabelValues(op).Observe(d.Seconds())
		})
	}
	if s, ok := a.cfg.Store.(store.Observable); ok {
		s.SetObserver(func(d time.Duration, outcome string) {
			m.txDuration.WithLabelValues(outcome).Observe(d.Seconds())
			if outcome == "conflict" {
				m.conflicts.Inc()
			}
		})
	}
	return m
}

// Request, RateLimited and Audited are the API's api.Metrics.
func (m *appMetrics) Request(route, method string, code int, d time.Duration) {
	m.requests.WithLabelValues(route, method, strconv.Itoa(code)).Inc()
	m.duration.WithLabelValues(route, method).Observe(d.Seconds())
}

func (m *appMetrics) RateLimited(scope string) { m.limited.WithLabelValues(scope).Inc() }

func (m *appMetrics) Audited(err error) {
	if err != nil {
		m.audited.WithLabelValues("failed").Inc()
		return
	}
	m.audited.WithLabelValues("written").Inc()
}

// lead wraps an election so that kmsd_leader says who leads.
func (m *appMetrics) lead(lead func(context.Context, string, func(context.Context))) func(context.Context, string, func(context.Context)) {
	return func(ctx context.Context, role string, work func(context.Context)) {
		g := m.leader.WithLabelValues(role)
		g.Set(0)
		lead(ctx, role, func(ctx context.Context) {
			g.Set(1)
			defer g.Set(0)
			work(ctx)
		})
	}
}

// Describe sends the descriptors of what collect reads.
func (m *appMetrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descCache, descGenRunning, descGenSlots, descGenRefused, descHSMUp, descHSMReconnect,
		descAuditSize, descCPSize, descUncovered, descBehind, descWALUsed, descWALSize, descArchived, descArchiveLag,
		descArchiveFail, descPruned, descTokExpiring, descTokSoonest, descTokScanErr, descWatchSilence,
		descRotations, descOverdueKeys, descOverdueSecs, descLastScan, descStaleness, descScanFailures} {
		ch <- d
	}
}

// Collect reads the figures a scrape reports. Store reads are bounded by
// a timeout; what fails to be read is left out of the scrape (and the
// token scan says so).
func (m *appMetrics) Collect(ch chan<- prometheus.Metric) {
	a := m.a
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	st := a.Service.Stats()
	counter(descCache, float64(st.KeyCacheHits), "private_key", "hit")
	counter(descCache, float64(st.KeyCacheMisses), "private_key", "miss")
	counter(descCache, float64(st.RecordCacheHits), "record", "hit")
	counter(descCache, float64(st.RecordCacheMisses), "record", "miss")
	counter(descCache, float64(st.RecordCacheStale), "record", "stale")
	gauge(descGenRunning, float64(st.GenerationsRunning))
	gauge(descGenSlots, float64(st.GenerationSlots))
	counter(descGenRefused, float64(st.GenerationsRefused))
	rs := a.Service.RotationStats()
	counter(descRotations, float64(rs.ScheduledRotations), "ok")
	counter(descRotations, float64(rs.ScheduledFailures), "error")
	gauge(descOverdueKeys, float64(rs.OverdueKeys))
	gauge(descOverdueSecs, rs.OldestOverdue.Seconds())
	counter(descScanFailures, float64(rs.ScanFailures))
	if !rs.LastCompleteScan.IsZero() {
		gauge(descLastScan, float64(rs.LastCompleteScan.UnixNano())/1e9)
	}
	if s, ok := a.cfg.Sealer.(*hsm.Sealer); ok {
		up := 0.0
		if s.Connected() {
			up = 1
		}
		gauge(descHSMUp, up)
		counter(descHSMReconnect, float64(s.Reconnects()))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if as := a.cfg.AuditStore; as != nil && a.Audit != nil {
		// The log's size and newest checkpoint are store reads (and the
		// size moves the journal into the store first): read at most once
		// per auditReadEvery, however often the listener is scraped.
		m.mu.Lock()
		now := time.Now()
		if m.auditAt.IsZero() || now.Sub(m.auditAt) >= auditReadEvery {
			m.auditAt = now
			size, serr := as.AuditSize(ctx)
			cp, _, cerr := as.LatestCheckpoint(ctx)
			if cerr != nil {
				cp = 0 // none yet (or unreadable: then the size is left out)
			}
			m.auditOK = serr == nil
			if m.auditOK {
				uncovered := size > cp
				switch {
				case !uncovered:
					m.behindFrom = time.Time{}
				case m.behindFrom.IsZero() || cp != m.cpSize:
					m.behindFrom = now
				}
				m.auditSize, m.cpSize = size, cp
			}
		}
		ok, size, cp, behindFrom := m.auditOK, m.auditSize, m.cpSize, m.behindFrom
		m.mu.Unlock()
		if ok {
			gauge(descAuditSize, float64(size))
			gauge(descCPSize, float64(cp))
			uncovered := uint64(0)
			if size > cp {
				uncovered = size - cp
			}
			gauge(descUncovered, float64(uncovered))
			behind := 0.0
			if !behindFrom.IsZero() {
				behind = now.Sub(behindFrom).Seconds()
			}
			gauge(descBehind, behind)
		}
		if e, ok := as.(interface{ JournalUse() (int64, int64) }); ok {
			used, size := e.JournalUse()
			if size > 0 {
				gauge(descWALUsed, float64(used))
				gauge(descWALSize, float64(size))
			}
		}
	}
	if a.Archiver != nil {
		as := a.archiveStatus(ctx)
		gauge(descArchived, float64(as.Archived))
		gauge(descArchiveLag, float64(as.Lag))
		failing := 0.0
		if ns := a.failingSince.Load(); ns != 0 {
			failing = time.Since(time.Unix(0, ns)).Seconds()
		}
		gauge(descArchiveFail, failing)
		gauge(descPruned, float64(as.PrunedBelow))
	}
	m.collectTokens(ctx, gauge)
	if s, ok := a.cfg.Store.(interface{ SinceHeard() time.Duration }); ok {
		gauge(descWatchSilence, s.SinceHeard().Seconds())
	}
	if s, ok := a.cfg.Store.(interface{ Staleness() time.Duration }); ok {
		gauge(descStaleness, s.Staleness().Seconds())
	}
}

// collectTokens reports the tokens expiring, read at most once per
// tokenScanEvery.
func (m *appMetrics) collectTokens(ctx context.Context, gauge func(*prometheus.Desc, float64, ...string)) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.tokAt.IsZero() || time.Since(m.tokAt) >= tokenScanEvery {
		m.tokAt = time.Now()
		ex, soonest, err := m.a.Service.TokenExpiries(ctx, 24*time.Hour, 7*24*time.Hour)
		m.tokErr = err != nil
		if err == nil {
			m.tokCounts = m.tokCounts[:0]
			for i, w := range []string{"24h", "168h"} {
				m.tokCounts = append(m.tokCounts, tokenCount{within: w, renewable: ex[i].Renewable, last: ex[i].Final})
			}
			m.tokSoonest = soonest
		}
	}
	scanErr := 0.0
	if m.tokErr {
		scanErr = 1
	}
	gauge(descTokScanErr, scanErr)
	for _, c := range m.tokCounts {
		gauge(descTokExpiring, float64(c.renewable), c.within, "true")
		gauge(descTokExpiring, float64(c.last), c.within, "false")
	}
	if !m.tokSoonest.IsZero() {
		gauge(descTokSoonest, float64(m.tokSoonest.UnixNano())/1e9)
	}
}
