package hemcp

import (
	"crypto/sha256"
	"fmt"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/api/client"
)

// TestIntrospectionCacheIsBounded: clients presenting ever new tokens
// cannot grow the cache past maxIntro; when it is full, expired answers
// are what goes.
func TestIntrospectionCacheIsBounded(t *testing.T) {
	s := &Server{cfg: Config{IntrospectTTL: time.Hour}, intro: map[[32]byte]introEntry{}}
	for i := 0; i < 3*maxIntro; i++ {
		s.remember(sha256.Sum256([]byte(fmt.Sprint(i))), &client.Introspection{}, time.Now())
		if len(s.intro) > maxIntro {
			t.Fatalf("%d entries after %d tokens", len(s.intro), i+1)
		}
	}
	// Fill it to the limit, then let every answer expire: the next answer
	// drops the expired ones, not the new one.
	for i := 0; len(s.intro) < maxIntro; i++ {
		s.remember(sha256.Sum256([]byte(fmt.Sprint("fill", i))), &client.Introspection{}, time.Now())
	}
	s.cfg.IntrospectTTL = time.Nanosecond
	time.Sleep(time.Millisecond)
	fresh := sha256.Sum256([]byte("fresh"))
	s.remember(fresh, &client.Introspection{Active: true}, time.Now())
	if _, ok := s.intro[fresh]; !ok || len(s.intro) != 1 {
		t.Fatalf("full of expired answers: %d entries after one more, fresh kept: %v", len(s.intro), ok)
	}
}
