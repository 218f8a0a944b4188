"""The programs on top of the library, apart from it.

- :mod:`.cli`: the ``pagedkv`` command (``demo``, ``bench``, ``info``, ``generate``, ``serve``,
  ``verify``);
- :mod:`.demo` and :mod:`.model`: a tiny Llama-style model in numpy, served from a paged
  cache, to show the paging at work;
- :mod:`.bench`: the quick benchmark ``pagedkv bench`` prints.

Imports anything below; nothing in the library imports it.
"""
