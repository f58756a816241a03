package kms

import (
	"context"
	"sync"
)

// readCache keeps the records every request reads (key headers, versions,
// tokens) decoded in memory. It is driven by the store's change feed
// (Store.Watch): a committed change drops the records it names before the
// write that made it is acknowledged, so a revoked token or a disabled
// version is refused by the very next request. A replicated store drives
// the same feed from its watch.
//
// Values in the cache are shared by every reader and must not be changed;
// the Service changes records only inside Store.UpdateKey, on the store's
// own copies.
//
// A load that raced with an invalidation must not put back what it read
// before the change: each load notes the cache's generation first, every
// invalidation advances it, and a put whose generation is stale is dropped.
type readCache struct {
	mu       sync.RWMutex
	gen      uint64
	keys     map[string]*Key
	versions map[VersionRef]*Version
	tokens   map[string]*Token
	max      int // entries per map
	off      bool
}

func newReadCache(max int) *readCache {
	return &readCache{max: max, off: max < 0,
		keys: map[string]*Key{}, versions: map[VersionRef]*Version{}, tokens: map[string]*Token{}}
}

// invalidate drops what changes name. A header change drops only the
// header: versions are records of their own, with their own changes.
func (c *readCache) invalidate(changes []Change) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	for _, ch := range changes {
		switch {
		case ch.All:
			clear(c.keys)
			clear(c.versions)
			clear(c.tokens)
		case ch.Token != "":
			delete(c.tokens, ch.Token)
		case ch.Version != 0:
			delete(c.versions, VersionRef{ch.Key, ch.Version})
		default:
			delete(c.keys, ch.Key)
		}
	}
}

// generation is read before a load from the store.
func (c *readCache) generation() uint64 {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.gen
}

// put stores v under k in m unless an invalidation happened since gen; a
// full map drops an arbitrary entry first.
func put[K comparable, V any](c *readCache, m map[K]V, k K, v V, gen uint64) {
	if c.off {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.gen != gen {
		return
	}
	if len(m) >= c.max {
		for old := range m {
			delete(m, old)
			break
		}
	}
	m[k] = v
}

func get[K comparable, V any](c *readCache, m map[K]V, k K) (V, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	v, ok := m[k]
	return v, ok
}

// cacheFresh reports whether cached records may be served: always on a
// store whose change feed does not lag; on replicas only while every
// change committed more than StaleBound ago has reached the cache (a
// replica that was paused, partitioned or slow reads from etcd until its
// watch catches up).
func (s *Service) cacheFresh() bool {
	return s.fresh == nil || s.fresh.FreshWithin(s.bound)
}

// cached returns m's record under k: from the cache while it may be
// served (cacheFresh), else read by load and put back (unless a change
// came meanwhile). Values are shared: read only.
func cached[K comparable, V any](s *Service, m map[K]V, k K, load func() (V, error)) (V, error) {
	if s.cacheFresh() {
		if v, ok := get(s.rc, m, k); ok {
			s.counts.readHits.Add(1)
			return v, nil
		}
		s.counts.readMisses.Add(1)
	} else {
		s.counts.readStale.Add(1)
	}
	gen := s.rc.generation()
	v, err := load()
	if err != nil {
		var zero V
		return zero, err
	}
	put(s.rc, m, k, v, gen)
	return v, nil
}

// cachedKey returns the header of a key, from the cache or the store.
func (s *Service) cachedKey(ctx context.Context, name string) (*Key, error) {
	return cached(s, s.rc.keys, name, func() (*Key, error) { return s.store.GetKey(ctx, name) })
}

// cachedVersion returns version n of a key, from the cache or the store.
func (s *Service) cachedVersion(ctx context.Context, name string, n uint64) (*Version, error) {
	return cached(s, s.rc.versions, VersionRef{name, n}, func() (*Version, error) { return s.store.GetVersion(ctx, name, n) })
}

// cachedToken returns a token record, from the cache or the store. Unknown
// ids are not cached (load fails), so guessing fills nothing.
func (s *Service) cachedToken(ctx context.Context, id string) (*Token, error) {
	return cached(s, s.rc.tokens, id, func() (*Token, error) { return s.store.GetToken(ctx, id) })
}
