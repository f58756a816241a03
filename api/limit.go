package api

import (
	"context"
	"math"
	"net"
	"sync"
	"time"

	"github.com/kmsd-project/kmsd/kms"
)

// rateLimiter is a token bucket per key (a client address, or a token id),
// for a bounded number of keys: past maxKeys, new keys share one bucket, so
// an attacker with many addresses cannot grow it.
type rateLimiter struct {
	rate, burst float64
	now         func() time.Time

	mu      sync.Mutex
	buckets map[string]*bucket
}

type bucket struct {
	tokens float64
	last   time.Time
}

const (
	maxLimiterKeys = 4096
	overflowKey    = "(other sources)"
)

func newRateLimiter(rate float64, burst int, now func() time.Time) *rateLimiter {
	if rate <= 0 {
		return nil
	}
	if burst < 1 {
		burst = int(math.Ceil(rate))
	}
	return &rateLimiter{rate: rate, burst: float64(burst), now: now, buckets: map[string]*bucket{}}
}

// allow takes one token from key's bucket. If none is left it returns false
// and how long until one is.
func (l *rateLimiter) allow(key string) (bool, time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	b, ok := l.buckets[key]
	if !ok {
		if len(l.buckets) >= maxLimiterKeys {
			l.evictFull(now)
		}
		if len(l.buckets) >= maxLimiterKeys {
			key = overflowKey
			b = l.buckets[key]
		}
		if b == nil {
			b = &bucket{tokens: l.burst, last: now}
			l.buckets[key] = b
		}
	}
	b.tokens = math.Min(l.burst, b.tokens+now.Sub(b.last).Seconds()*l.rate)
	b.last = now
	if b.tokens >= 1 {
		b.tokens--
		return true, 0
	}
	return false, time.Duration((1 - b.tokens) / l.rate * float64(time.Second))
}

// evictFull drops the buckets that have refilled: they hold no state worth
// keeping.
func (l *rateLimiter) evictFull(now time.Time) {
	for k, b := range l.buckets {
		if b.tokens+now.Sub(b.last).Seconds()*l.rate >= l.burst {
			delete(l.buckets, k)
		}
	}
}

// refusals counts, per source, the requests refused over the limit in the
// current window; each source's count becomes one audit record when its
// window ends, instead of one record per refusal.
type refusals struct {
	window time.Duration
	mu     sync.Mutex
	m      map[string]*refusal
}

type refusal struct {
	count       uint64
	first, last time.Time
}

func (r *refusals) note(src string, now time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.m == nil {
		r.m = map[string]*refusal{}
	}
	if _, ok := r.m[src]; !ok && len(r.m) >= maxLimiterKeys {
		src = overflowKey
	}
	f := r.m[src]
	if f == nil {
		f = &refusal{first: now}
		r.m[src] = f
	}
	f.count++
	f.last = now
}

// due takes the windows that ended before now (all of them if all).
func (r *refusals) due(now time.Time, all bool) map[string]refusal {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[string]refusal{}
	for src, f := range r.m {
		if all || now.Sub(f.first) >= r.window {
			out[src] = *f
			delete(r.m, src)
		}
	}
	return out
}

// sourceOf is the client address a limit applies to: the IP, without the
// port.
func sourceOf(remoteAddr string) string {
	if h, _, err := net.SplitHostPort(remoteAddr); err == nil {
		return h
	}
	return remoteAddr
}

// FlushRefusals writes one audit record per source whose window of refused
// requests has ended (every window, if all), and returns how many it wrote.
func (s *Server) FlushRefusals(ctx context.Context, all bool) (int, error) {
	n := 0
	for src, f := range s.refused.due(time.Now(), all) {
		rec := &kms.AuditRecord{
			Time: time.Now().UTC().Format(time.RFC3339Nano), Actor: "anonymous", Source: clipField(src, 64),
			Operation: "requests refused over the unauthenticated rate limit", Status: 429, Problem: ProbRateLimited,
			Count: f.count, First: f.first.UTC().Format(time.RFC3339Nano), Last: f.last.UTC().Format(time.RFC3339Nano),
		}
		if s.opts.Audit == nil {
			continue
		}
		if err := s.opts.Audit.AppendAudit(ctx, rec); err != nil {
			return n, err
		}
		if s.opts.Stream != nil {
			s.opts.Stream.Emit(rec.Encode())
		}
		n++
	}
	return n, nil
}

// Run does the API's background work until ctx ends: it writes the
// summaries of refused requests as their windows end, and the rest at the
// end.
func (s *Server) Run(ctx context.Context) {
	t := time.NewTicker(s.refused.window / 4)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			if _, err := s.FlushRefusals(context.WithoutCancel(ctx), true); err != nil {
				s.log.Error("audit: summary of refused requests", "err", err)
			}
			return
		case <-t.C:
			if _, err := s.FlushRefusals(ctx, false); err != nil {
				s.log.Error("audit: summary of refused requests", "err", err)
			}
		}
	}
}

// RecordTLSRefusal audits a connection refused during the TLS handshake
// (mutual TLS without a valid client certificate), before any request was
// read. Refusals count against the address's unauthenticated limit; past
// it they are summarized like refused requests.
func (s *Server) RecordTLSRefusal(remote, reason string) {
	src := sourceOf(remote)
	if s.unauth != nil {
		if ok, _ := s.unauth.allow(src); !ok {
			s.refused.note(src, time.Now())
			return
		}
	}
	s.log.Warn("TLS handshake refused", "remote", remote, "reason", reason)
	if s.opts.Audit == nil {
		return
	}
	rec := &kms.AuditRecord{Time: time.Now().UTC().Format(time.RFC3339Nano), Actor: "anonymous", Source: clipField(remote, 64),
		Operation: clipField("TLS handshake refused: "+reason, 160), Status: 401, Problem: ProbUnauthenticated}
	if err := s.opts.Audit.AppendAudit(context.Background(), rec); err != nil {
		s.log.Error("audit: TLS refusal not recorded", "err", err)
		return
	}
	if s.opts.Stream != nil {
		s.opts.Stream.Emit(rec.Encode())
	}
}
