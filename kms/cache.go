package kms

import (
	"strconv"
	"sync"
	"time"
)

// keyCache holds unsealed private keys for a bounded time and count, so a hot
// signing key costs one HSM round trip per TTL, not per request.
type keyCache struct {
	ttl   time.Duration // < 0: off
	size  int
	clock Clock

	mu sync.Mutex
	m  map[string]cacheEntry
}

type cacheEntry struct {
	key     PrivateKey
	expires time.Time
}

func newKeyCache(ttl time.Duration, size int, clock Clock) *keyCache {
	return &keyCache{ttl: ttl, size: size, clock: clock, m: map[string]cacheEntry{}}
}

func cacheKey(name string, n uint64) string { return name + "\x00" + strconv.FormatUint(n, 10) }

func (c *keyCache) get(name string, n uint64) (PrivateKey, bool) {
	if c.ttl < 0 {
		return nil, false
	}
	k := cacheKey(name, n)
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[k]
	if !ok {
		return nil, false
	}
	if !c.clock.Now().Before(e.expires) {
		delete(c.m, k)
		return nil, false
	}
	return e.key, true
}

func (c *keyCache) put(name string, n uint64, pk PrivateKey) {
	if c.ttl < 0 {
		return
	}
	now := c.clock.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.m) >= c.size {
		for k, e := range c.m {
			if !now.Before(e.expires) {
				delete(c.m, k)
			}
		}
		for k := range c.m {
			if len(c.m) < c.size {
				break
			}
			delete(c.m, k)
		}
	}
	c.m[cacheKey(name, n)] = cacheEntry{key: pk, expires: now.Add(c.ttl)}
}

func (c *keyCache) evict(name string, n uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.m, cacheKey(name, n))
}
