package hemcp

import (
	"crypto/sha256"
	"fmt"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/api/client"
)

// TestIntrospectionCacheIsBounded: clients presenting ever new tokens
// cannot grow the cache past maxIntro; answers within their TTL survive
// while expired ones are what goes first.
func TestIntrospectionCacheIsBounded(t *testing.T) {
	s := &Server{cfg: Config{IntrospectTTL: time.Hour}, intro: map[[32]byte]introEntry{}}
	keep := sha256.Sum256([]byte("kept"))
	s.remember(keep, &client.Introspection{Active: true})
	for i := 0; i < 3*maxIntro; i++ {
		s.remember(sha256.Sum256([]byte(fmt.Sprint(i))), &client.Introspection{})
		if len(s.intro) > maxIntro {
			t.Fatalf("%d entries after %d tokens", len(s.intro), i+1)
		}
	}
	// With a TTL that has passed, a full cache drops the expired answers
	// and keeps the new one.
	s.cfg.IntrospectTTL = time.Nanosecond
	time.Sleep(time.Millisecond)
	fresh := sha256.Sum256([]byte("fresh"))
	s.remember(fresh, &client.Introspection{Active: true})
	if _, ok := s.intro[fresh]; !ok || len(s.intro) != 1 {
		t.Fatalf("after expiry: %d entries, fresh kept: %v", len(s.intro), ok)
	}
}
