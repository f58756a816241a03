package kms

import (
	"context"
	"sync/atomic"
	"time"
)

// counts are the service's running figures, read by Stats (metrics).
type counts struct {
	keyHits, keyMisses   atomic.Uint64 // the unsealed-key cache
	readHits, readMisses atomic.Uint64 // the record cache (headers, versions, tokens)
	readStale            atomic.Uint64 // reads past the cache while the change feed was not fresh
	genRefused           atomic.Uint64 // HE generations refused: every slot taken
}

// Stats are the service's figures since start.
type Stats struct {
	// KeyCacheHits and KeyCacheMisses count lookups of unsealed private
	// keys: a miss costs an unseal in the HSM.
	KeyCacheHits, KeyCacheMisses uint64
	// RecordCacheHits and RecordCacheMisses count reads of key headers,
	// versions and tokens: a miss costs a store read.
	RecordCacheHits, RecordCacheMisses uint64
	// RecordCacheStale counts reads that went to the store because the
	// change feed was not fresh within StaleBound (replicas).
	RecordCacheStale uint64
	// GenerationsRunning is the HE keyset generations running now, of
	// GenerationSlots; GenerationsRefused counts those refused because
	// every slot was taken.
	GenerationsRunning, GenerationSlots int
	GenerationsRefused                  uint64
}

// Stats returns the service's figures.
func (s *Service) Stats() Stats {
	return Stats{
		KeyCacheHits: s.counts.keyHits.Load(), KeyCacheMisses: s.counts.keyMisses.Load(),
		RecordCacheHits: s.counts.readHits.Load(), RecordCacheMisses: s.counts.readMisses.Load(), RecordCacheStale: s.counts.readStale.Load(),
		GenerationsRunning: len(s.generations), GenerationSlots: cap(s.generations),
		GenerationsRefused: s.counts.genRefused.Load(),
	}
}

// Expiring counts the live tokens (neither revoked nor expired) that
// expire within a window of now, among those whose whole lifetime (to
// their expiry, or to their max_lifetime if they renew) is longer than
// the window: long-lived credentials about to lapse, not short-lived
// ones working as made (a 1 h CI token is always "within 24 h").
type Expiring struct {
	Within    time.Duration
	Renewable int // tokens that can still renew past the window (max_lifetime beyond it)
	Final     int // tokens that cannot: they stop working within the window
}

// TokenExpiries counts, for each window, the long-lived live tokens
// that expire in it (see Expiring), and returns the earliest time a live
// token stops working for good (zero if none). It reads every token
// record: call it seldom.
func (s *Service) TokenExpiries(ctx context.Context, windows ...time.Duration) ([]Expiring, time.Time, error) {
	now := s.clock.Now()
	out := make([]Expiring, len(windows))
	for i, w := range windows {
		out[i].Within = w
	}
	var soonest time.Time
	after := ""
	for {
		batch, err := s.store.ListTokens(ctx, after, 1000)
		if err != nil {
			return nil, time.Time{}, asUnavailable("store", err)
		}
		for _, t := range batch {
			after = t.ID
			if t.RevokedAt != nil || t.ExpiresAt == nil || t.Expired(now) {
				continue
			}
			// The latest this token can work: its max lifetime if it
			// renews, its expiry otherwise.
			end := *t.ExpiresAt
			if t.MaxExpiresAt != nil && t.MaxExpiresAt.After(end) {
				end = *t.MaxExpiresAt
			}
			for i, w := range windows {
				limit := now.Add(w)
				if t.ExpiresAt.After(limit) || end.Sub(t.CreatedAt) <= w {
					continue
				}
				if end.After(limit) {
					out[i].Renewable++
				} else {
					out[i].Final++
				}
			}
			if soonest.IsZero() || end.Before(soonest) {
				soonest = end
			}
		}
		if len(batch) < 1000 {
			return out, soonest, nil
		}
	}
}
